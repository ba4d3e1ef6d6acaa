"""The modelfiles the daemon knows: shipped ones, overridden and extended by the user's.

Files are re-read when they change, so editing a modelfile takes effect without a
restart. A broken file is reported (file, key, problem) and skipped; the others serve.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from daemon.names import ModelName
from daemon.registry.modelfile import Modelfile, ModelfileError, load_file

log = logging.getLogger(__name__)


def shipped_modelfiles_dir() -> Path:
    """The shipped modelfiles: `daemon/modelfiles` in an installed wheel, else `modelfiles/`
    beside the package (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "modelfiles"
    return installed if installed.is_dir() else package.parent / "modelfiles"


class Registry:
    def __init__(self, directories: list[Path]) -> None:
        self._directories = directories
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._by_family: dict[str, dict[str, Modelfile]] = {}
        self.errors: list[ModelfileError] = []

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for d in self._directories:
            if d.is_dir():
                files.extend(sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml")))
        return files

    def _refresh(self) -> None:
        files = self._files()
        stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
        if stamp == self._stamp:
            return
        by_family: dict[str, dict[str, Modelfile]] = {}
        errors: list[ModelfileError] = []
        for f in files:  # later directories (the user's) override earlier ones per tag
            try:
                tags = load_file(f)
            except ModelfileError as exc:
                log.error("modelfile skipped: %s", exc)
                errors.append(exc)
                continue
            for tag, modelfile in tags.items():
                by_family.setdefault(modelfile.name.model.lower(), {})[tag] = modelfile
        self._by_family, self.errors, self._stamp = by_family, errors, stamp

    def find(self, name: ModelName) -> Modelfile | None:
        """The modelfile for a name in the default namespace, matched case-insensitively."""
        if not name.is_default_namespace:
            return None
        with self._lock:
            self._refresh()
            return self._by_family.get(name.model.lower(), {}).get(name.tag.lower())

    def all(self) -> list[Modelfile]:
        with self._lock:
            self._refresh()
            return [m for tags in self._by_family.values() for m in tags.values()]
