"""Manifests: one JSON file per model name, `$OLLAMA_MODELS/manifests/<host>/<ns>/<model>/<tag>`.

A manifest says where a model's files are (a Hub repo at a commit, blobs, an installed
package or a path), lists them with sizes and sha256, and holds the settings it runs with.
It is written atomically (temporary file, fsync, rename), so a crash leaves either the old
manifest or the new one, never half of one; and it is written only once every file it lists
is complete and verified. The model's digest is the sha256 of the manifest's bytes, which
do not include the name, so a copy has the same digest as its original (as in Ollama).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from daemon.names import ModelName
from daemon.store import pathnames
from daemon.store.pathnames import UnsafeName

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the model's folder
    size: int
    sha256: str
    blob: str = ""  # the hub cache blob name (etag), when stored there

    def to_json(self) -> dict[str, Any]:
        out = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.blob:
            out["blob"] = self.blob
        return out


@dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]  # {"kind": "repo", "repo", "revision", "commit", "gguf"?} | {"kind": "files"} | ...
    files: tuple[FileEntry, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # quantization, parameters, system, ...
    modelfile: str | None = None  # a modelfile tag whose live settings apply (pulled names)
    parent: str = ""  # what it was created or copied from

    def to_bytes(self) -> bytes:
        doc = {
            "schemaVersion": SCHEMA_VERSION,
            "source": self.source,
            "files": [f.to_json() for f in self.files],
            "settings": self.settings,
        }
        if self.modelfile:
            doc["modelfile"] = self.modelfile
        if self.parent:
            doc["parent"] = self.parent
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        """Parse and check a manifest; DamagedManifest says what is wrong with one."""
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("schemaVersion") != SCHEMA_VERSION:
                raise ValueError(f"unsupported manifest schema {doc.get('schemaVersion')!r}")
            source, files, settings = doc.get("source"), doc.get("files"), doc.get("settings", {})
            _check_source(source)
            if not isinstance(files, list) or not isinstance(settings, dict):
                raise ValueError("files must be a list and settings an object")
            entries = tuple(_file_entry(f) for f in files)
            modelfile, parent = doc.get("modelfile"), doc.get("parent", "")
            if not isinstance(modelfile, (str, type(None))) or not isinstance(parent, str):
                raise ValueError("modelfile and parent must be strings")
        except (ValueError, TypeError, UnsafeName) as exc:  # JSON errors are ValueErrors
            raise DamagedManifest(str(exc)) from None
        return cls(source=source, files=entries, settings=settings, modelfile=modelfile, parent=parent)


class DamagedManifest(ValueError):
    """A manifest file that cannot be read: truncated, edited by hand, or of another tool."""


SOURCE_KINDS = ("repo", "files", "package", "path")


def _check_source(source: Any) -> None:
    """The source's names become paths (the hub cache, files/<id>): check them here."""
    if not isinstance(source, dict) or source.get("kind") not in SOURCE_KINDS:
        raise ValueError(f"source must be an object with a kind of {', '.join(SOURCE_KINDS)}")
    if any(not isinstance(v, str) for v in source.values()):
        raise ValueError("source values must be strings")
    if source["kind"] == "repo":
        for key, check in (("repo", pathnames.repo_id), ("revision", pathnames.revision), ("commit", pathnames.commit)):
            check(source.get(key))
    elif source["kind"] == "files":
        pathnames.folder_id(source.get("id"))
    if source.get("gguf") is not None:
        pathnames.relative_path(source["gguf"])


def _file_entry(raw: Any) -> FileEntry:
    if not isinstance(raw, dict):
        raise ValueError("a file entry must be an object")
    path, size, sha256, blob = raw.get("path"), raw.get("size"), raw.get("sha256"), raw.get("blob", "")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha256, str) \
            or not isinstance(blob, str):
        raise ValueError(f"file entry {path!r} needs a size and a sha256")
    if blob:
        pathnames.blob_id(blob)
    return FileEntry(pathnames.relative_path(path), size, sha256, blob)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass(frozen=True)
class StoredManifest:
    name: ModelName
    manifest: Manifest
    path: Path
    modified_at: float


class ManifestStore:
    def __init__(self, root: Path) -> None:
        self.root = root  # $OLLAMA_MODELS/manifests
        self._reported: set[tuple[str, int]] = set()  # damaged files already logged
        self.generation = 0  # counts this process's writes and deletes (the catalog's memo)

    def path_of(self, name: ModelName) -> Path:
        return self.root.joinpath(*name.path_parts())

    def read(self, name: ModelName) -> StoredManifest | None:
        """The name's manifest, None if there is none; DamagedManifest if it cannot be read."""
        path = self.path_of(name)
        try:
            raw = path.read_bytes()
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # a folder where the file should be, no permission, ...
            raise DamagedManifest(exc.strerror or str(exc)) from None
        return StoredManifest(self._name_of(path), Manifest.from_bytes(raw), path, stat.st_mtime)

    def exists(self, name: ModelName) -> bool:
        """Whether the name has a manifest file, readable or not (a damaged one can be deleted)."""
        return self.path_of(name).is_file()

    def write(self, name: ModelName, manifest: Manifest) -> None:
        write_atomic(self.path_of(name), manifest.to_bytes())
        self.generation += 1

    def delete(self, name: ModelName) -> bool:
        path = self.path_of(name)
        self.generation += 1
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        for parent in list(path.parents)[:3]:  # tidy empty model/namespace/host folders
            try:
                parent.rmdir()
            except OSError:
                break
        return True

    def _name_of(self, path: Path) -> ModelName:
        host, namespace, model, tag = path.relative_to(self.root).parts
        return ModelName(host, namespace, model, tag)

    def all(self) -> Iterator[StoredManifest]:
        """Every readable manifest; a damaged one is skipped, and the log says which and why
        (once per version of the file)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/*/*/*"):
            if path.is_file() and not path.name.startswith("."):
                try:
                    yield StoredManifest(self._name_of(path), Manifest.from_bytes(path.read_bytes()), path,
                                         path.stat().st_mtime)
                except (ValueError, OSError) as exc:
                    self._report(path, exc)

    def _report(self, path: Path, exc: BaseException) -> None:
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            key = (str(path), 0)
        if key not in self._reported:
            self._reported.add(key)
            log.warning("skipping the damaged manifest %s (%s): delete the model or pull it again", path, exc)
