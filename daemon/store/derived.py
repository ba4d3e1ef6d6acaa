"""Artifacts derived once from a model's files and kept in the store: a GGUF converted to
an HF folder, and (later) quantized weights. Each is built in a temporary folder and
renamed into place, under a file lock, so a crash or a second process never sees half of
one."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

_COMPLETE = ".complete"
_SOURCES = ".sources.json"


class DerivedCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Path | None:
        final = self.path(key)
        return final if (final / _COMPLETE).exists() else None

    def get_or_build(self, key: str, build: Callable[[Path], None], sources: Iterable[str] = ()) -> Path:
        """The folder for `key`, calling build(tmp_folder) first if it does not exist.
        `sources`: the sha256 of the files it is made from, so that deleting them prunes it."""
        done = self.get(key)
        if done is not None:
            return done
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / f".{key}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            done = self.get(key)
            if done is not None:
                return done
            tmp = self.root / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build(tmp)
                (tmp / _SOURCES).write_text(json.dumps(sorted(sources)))
                (tmp / _COMPLETE).write_text("")
                final = self.path(key)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return final

    def prune(self, removed: set[str]) -> None:
        """Remove what was made from files now gone (`removed`: their sha256)."""
        if not removed or not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                sources = set(json.loads((folder / _SOURCES).read_text()))
            except (OSError, ValueError, TypeError):
                continue  # made before sources were recorded: kept
            if sources & removed:
                log.info("removing %s: the files it was made from are deleted", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
