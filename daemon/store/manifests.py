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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from daemon.names import ModelName

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
        doc = json.loads(raw)
        if doc.get("schemaVersion") != SCHEMA_VERSION:
            raise ValueError(f"unsupported manifest schema {doc.get('schemaVersion')!r}")
        return cls(
            source=doc["source"],
            files=tuple(FileEntry(f["path"], int(f["size"]), f["sha256"], f.get("blob", "")) for f in doc["files"]),
            settings=doc.get("settings", {}),
            modelfile=doc.get("modelfile"),
            parent=doc.get("parent", ""),
        )


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

    def path_of(self, name: ModelName) -> Path:
        return self.root.joinpath(*name.path_parts())

    def read(self, name: ModelName) -> StoredManifest | None:
        path = self.path_of(name)
        try:
            raw = path.read_bytes()
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return StoredManifest(self._name_of(path), Manifest.from_bytes(raw), path, stat.st_mtime)

    def write(self, name: ModelName, manifest: Manifest) -> None:
        write_atomic(self.path_of(name), manifest.to_bytes())

    def delete(self, name: ModelName) -> bool:
        path = self.path_of(name)
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
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/*/*/*"):
            if path.is_file() and not path.name.startswith("."):
                try:
                    yield StoredManifest(self._name_of(path), Manifest.from_bytes(path.read_bytes()), path,
                                         path.stat().st_mtime)
                except (ValueError, KeyError, OSError):
                    continue  # a foreign or corrupt file: not ours to list
