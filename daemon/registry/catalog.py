"""From a name to a model whose files are on this machine: `Catalog.resolve`.

A name resolves through the modelfiles to a source; a source is local when it is a path
or a file inside an installed package (the embedded default), or when the store holds a
pulled copy. Everything the API reports about a model (size, digest, details,
capabilities, template) is computed here once per file version and cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon.backends.metadata import ModelMetadata, read_metadata
from daemon.engine.output import HARMONY_CHANNEL, dialect_for
from daemon.errors import DaemonError, ModelDamaged, NotFound
from daemon.names import ModelName
from daemon.registry.modelfile import Modelfile, Source, source_from_json
from daemon.registry.registry import Registry

log = logging.getLogger(__name__)

# A chat template for models that ship none (base models): the text as given.
RAW_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@dataclass(frozen=True)
class ModelLocation:
    """Where the weights are: an HF folder, or a GGUF file."""

    path: Path
    format: str  # "gguf" | "safetensors"
    listed: tuple[Path, ...] | None = None  # the model's files, when the folder holds others too

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    def files(self) -> list[Path]:
        if self.listed is not None:
            return list(self.listed)
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())


class StoredModel(Protocol):
    name: ModelName
    modified_at: float

    @property
    def manifest(self) -> Any: ...


class PulledModels(Protocol):
    """What the store offers the catalog (the store implements it)."""

    def location_of(self, modelfile: Modelfile) -> ModelLocation | None: ...

    def location_of_manifest(self, manifest: Any) -> ModelLocation | None: ...

    def stored(self, name: ModelName) -> StoredModel | None: ...

    def all(self) -> list[StoredModel]: ...

    @property
    def generation(self) -> int: ...


def locate_local_source(source: Source) -> ModelLocation | None:
    """A package or path source on this machine, or None."""
    if source.kind == "package":
        spec = importlib.util.find_spec(source.package) if source.package else None
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / (source.file or "")
    elif source.kind == "path":
        path = Path(source.path or "").expanduser()
        if source.gguf:
            path = path / source.gguf
    else:
        return None
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(path=path, format="gguf")
    if path.is_dir() and (path / "config.json").is_file():
        return ModelLocation(path=path, format="safetensors")
    return None


@dataclass(frozen=True)
class ResolvedModel:
    name: ModelName
    modelfile: Modelfile
    location: ModelLocation
    metadata: ModelMetadata
    digest: str  # 64 hex: identifies this name's model and settings
    size: int  # bytes on disk
    modified_at: float  # unix seconds
    file_digests: dict[str, str] = field(default_factory=dict)  # weight file name -> sha256
    parent: str = ""  # what a created or copied model came from

    @property
    def template(self) -> str:
        return self.modelfile.template or self.metadata.chat_template or RAW_TEMPLATE

    @property
    def tool_dialect(self) -> str:
        """How this model writes tool calls (see daemon.engine.output)."""
        return dialect_for(self.template, self.modelfile.tool_parser)

    @property
    def quantization_level(self) -> str:
        return self.modelfile.quantization.label or self.metadata.quantization_level

    @property
    def capabilities(self) -> list[str]:
        if self.metadata.is_embedding_model:
            return ["embedding"]
        caps = ["completion"]
        if self.metadata.vision:
            caps.append("vision")
        template = self.template
        if "tools" in template or ".Tools" in template or self.modelfile.tool_parser:
            caps.append("tools")
        if self.modelfile.fim is not None or ".Suffix" in template:
            caps.append("insert")
        if "<think>" in template or "enable_thinking" in template or HARMONY_CHANNEL in template:
            caps.append("thinking")
        return caps

    def details(self) -> dict[str, Any]:
        return self.metadata.details(self.quantization_level, self.parent)

    @property
    def context_length(self) -> int:
        return self.metadata.context_length


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__).splitlines()[0]


FULL_HASH_LIMIT = 512 << 20  # bigger local files get a fingerprint, not a full sha256


def _file_sha256(path: Path, cache: dict[tuple, str]) -> str:
    """The file's sha256; for a large local file, a fingerprint (size, mtime, first and
    last MiB), so that resolving a 16 GB checkpoint does not read 16 GB. Blobs named by
    their sha256 (the store's and the hub cache's) are trusted by name."""
    real = path.resolve()
    name = real.name.removeprefix("sha256-")
    if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in cache:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            if st.st_size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f"fingerprint:{st.st_size}:{st.st_mtime_ns}".encode())
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), 2)
                h.update(f.read(1 << 20))
        cache[key] = h.hexdigest()
    return cache[key]


# Resolving reads the disk (the modelfiles' stats, the model's files and their digests): about
# 0.3-1 ms, half the event loop's work for a request, which a burst of 32 requests for one
# model paid 32 times over while the runner waited for the GIL. Within this window a name is
# resolved once; what this process writes (pulls, creates, copies, deletes) ends it at once,
# an edit on disk by hand is seen this much later.
RESOLVE_REUSE_SECONDS = 0.25


class Catalog:
    def __init__(self, registry: Registry, pulled: PulledModels | None = None) -> None:
        self.registry = registry
        self.pulled = pulled
        self._lock = threading.Lock()
        self._file_digests: dict[tuple, str] = {}
        self._metadata: dict[tuple, ModelMetadata] = {}
        self._reported: set[tuple] = set()  # unusable models already logged
        self._recent: dict[tuple, tuple[float, int, ResolvedModel]] = {}  # resolve's memo

    def locate(self, modelfile: Modelfile) -> ModelLocation | None:
        location = locate_local_source(modelfile.source)
        if location is None and self.pulled is not None:
            location = self.pulled.location_of(modelfile)
        return location

    def describe(self, modelfile: Modelfile, location: ModelLocation, stored: StoredModel | None = None) -> ResolvedModel:
        """Everything the API says about a model; ModelDamaged when its files cannot be read."""
        try:
            files = location.files()
            stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
            with self._lock:
                if stamp not in self._metadata:
                    self._metadata[stamp] = read_metadata(location.path)
                metadata = self._metadata[stamp]
                weights = [f for f in files if f.suffix in (".gguf", ".safetensors")]
                digests = {f.name: _file_sha256(f, self._file_digests) for f in weights}
        except Exception as exc:  # a truncated header, an LFS pointer, a file gone meanwhile, ...
            raise ModelDamaged(f"model '{modelfile.name.display}' cannot be used: its files cannot be read "
                               f"({_reason(exc)}); delete it, or pull or create it again") from None
        identity = {
            "source": modelfile.source.describe(),
            "files": digests,
            "quantization": modelfile.quantization.__dict__,
            "parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in modelfile.parameters.items()},
            "system": modelfile.system,
            "template": modelfile.template,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        modified = max((os.stat(f).st_mtime for f in files), default=0.0)
        if modelfile.origin and os.path.exists(modelfile.origin):
            modified = max(modified, os.stat(modelfile.origin).st_mtime)
        parent = ""
        if stored is not None:  # a manifest: its file's time, and what it was made from
            modified, parent = stored.modified_at, stored.manifest.parent
        return ResolvedModel(
            name=modelfile.name,
            modelfile=modelfile,
            location=location,
            metadata=metadata,
            digest=digest,
            size=sum(f.stat().st_size for f in files),
            modified_at=modified,
            file_digests=digests,
            parent=parent,
        )

    def modelfile_of(self, stored: StoredModel) -> Modelfile:
        """A manifest's settings; a name pulled through a modelfile follows that modelfile's
        current settings while it still names the same repo."""
        manifest = stored.manifest
        source = source_from_json(manifest.source)
        if manifest.modelfile:
            live = self.registry.find(ModelName.parse(manifest.modelfile))
            if live is not None and live.source.kind == "repo" and live.source.repo == source.repo:
                return live.with_overrides(name=stored.name, alias_of=None)
        return Modelfile.from_settings(stored.name, source, manifest.settings)

    def _resolve_stored(self, stored: StoredModel) -> ResolvedModel:
        assert self.pulled is not None
        location = self.pulled.location_of_manifest(stored.manifest)
        if location is None:
            raise ModelDamaged(f"model '{stored.name.display}' cannot be used: its files are missing; pull it again")
        return self.describe(self.modelfile_of(stored), location, stored)

    def resolve(self, name: ModelName) -> ResolvedModel:
        """The model for a valid name; NotFound (the caller words the message), or
        ModelDamaged (its message says what is wrong) for a model that cannot be used.
        A name resolved within RESOLVE_REUSE_SECONDS, with no manifest written or deleted by
        this process since, is not looked up again (see RESOLVE_REUSE_SECONDS)."""
        generation = getattr(self.pulled, "generation", 0)
        now = time.monotonic()
        with self._lock:
            recent = self._recent.get(name.key)
        if recent is not None and now - recent[0] < RESOLVE_REUSE_SECONDS and recent[1] == generation:
            return recent[2]
        resolved = self._resolve(name)
        with self._lock:
            if len(self._recent) > 256:
                self._recent.clear()
            self._recent[name.key] = (now, generation, resolved)
        return resolved

    def _resolve(self, name: ModelName) -> ResolvedModel:
        try:
            stored = self.pulled.stored(name) if self.pulled is not None else None
        except ValueError as exc:  # the store's DamagedManifest
            raise ModelDamaged(f"model '{name.display}' cannot be used: its manifest is damaged ({exc}); "
                               "delete it, or pull or create it again") from None
        if stored is not None:
            return self._resolve_stored(stored)
        modelfile = self.registry.find(name)
        if modelfile is None:
            raise NotFound(f"model '{name.display}' not found")
        location = self.locate(modelfile)
        if location is None:
            raise NotFound(f"model '{name.display}' not found")
        return self.describe(modelfile, location)

    def list_local(self) -> list[ResolvedModel]:
        """Every name that resolves here, as Ollama lists every name it holds: stored models,
        then modelfile tags (aliases included) whose files are local or pulled. A model that
        cannot be used is left out, and the log says why (once); using it says why too."""
        out: list[ResolvedModel] = []
        seen: set[tuple] = set()
        for stored in self.pulled.all() if self.pulled is not None else []:
            seen.add(stored.name.key)
            try:
                out.append(self._resolve_stored(stored))
            except Exception as exc:
                self._report(stored.name, exc)
        for modelfile in self.registry.all():
            if modelfile.name.key in seen:
                continue
            try:
                location = self.locate(modelfile)
                if location is not None:
                    out.append(self.describe(modelfile, location))
            except Exception as exc:
                self._report(modelfile.name, exc)
        out.sort(key=lambda m: m.modified_at, reverse=True)
        return out

    def _report(self, name: ModelName, exc: BaseException) -> None:
        text = exc.message if isinstance(exc, DaemonError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            if (name.key, text) in self._reported:
                return
            self._reported.add((name.key, text))
        log.warning("not listing %s: %s", name.display, text)
