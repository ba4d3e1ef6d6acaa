"""The store under OLLAMA_MODELS: pulled and created models, and everything they need.

    manifests/<host>/<ns>/<model>/<tag>   one JSON manifest per name (manifests.py)
    hub/models--org--name/...             Hub files in huggingface_hub's cache layout (hubcache.py)
    blobs/sha256-<hex>                    uploaded blobs (blobs.py)
    files/<id>/<name>                     a created model's file names, linked to its blobs
    derived/...                           converted or quantized artifacts (derived.py)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from daemon.errors import BadRequest, NotFound
from daemon.names import ModelName
from daemon.registry.catalog import ModelLocation, locate_local_source
from daemon.registry.modelfile import Modelfile, source_from_json, source_to_json
from daemon.store.blobs import BlobStore, parse_digest
from daemon.store.derived import DerivedCache
from daemon.store.filecheck import check_model_file
from daemon.store.download import Downloader
from daemon.store.hubcache import HubCache
from daemon.store.manifests import DamagedManifest, FileEntry, Manifest, ManifestStore, StoredManifest
from daemon.store.pull import PullPlan, PullError, plan_pull, watch

log = logging.getLogger(__name__)


class Store:
    def __init__(self, root: Path, hf_token: str | None = None, hf_endpoint: str | None = None) -> None:
        self.root = root
        self.manifests = ManifestStore(root / "manifests")
        self.hub = HubCache(root / "hub")
        self.blobs = BlobStore(root / "blobs")
        self.files_root = root / "files"
        self.derived = DerivedCache(root / "derived")
        self.hf_token = hf_token
        self.hf_endpoint = hf_endpoint
        self._downloader: Downloader | None = None
        self._pull_locks: dict[tuple, asyncio.Lock] = {}

    # ---- what the catalog asks ----------------------------------------------------------

    def location_of_manifest(self, manifest: Manifest) -> ModelLocation | None:
        s = manifest.source
        if s["kind"] == "repo":
            folder = self.hub.snapshot(s["repo"], s["commit"])
            path = folder / s["gguf"] if s.get("gguf") else folder
            paths = tuple(folder / f.path for f in manifest.files)
        elif s["kind"] == "files":
            folder = self.files_root / s["id"]
            path = folder / s["gguf"] if s.get("gguf") else folder
            paths = tuple(folder / f.path for f in manifest.files)
        else:
            return locate_local_source(source_from_json(manifest.source))
        if not all(p.exists() for p in paths):
            return None
        return ModelLocation(path=path, format="gguf" if str(path).endswith(".gguf") else "safetensors",
                             listed=paths)

    def manifest_holding(self, modelfile: Modelfile) -> Manifest | None:
        """A pulled manifest whose files are this modelfile's repo source (any name)."""
        if modelfile.source.kind != "repo":
            return None
        for stored in self.manifests.all():
            s = stored.manifest.source
            if s["kind"] == "repo" and s["repo"] == modelfile.source.repo and \
                    s.get("revision") == modelfile.source.revision and s.get("gguf") == modelfile.source.gguf \
                    and self.location_of_manifest(stored.manifest) is not None:
                return stored.manifest
        return None

    def location_of(self, modelfile: Modelfile) -> ModelLocation | None:
        """A modelfile's repo source, when some pulled manifest holds that repo and revision."""
        manifest = self.manifest_holding(modelfile)
        return self.location_of_manifest(manifest) if manifest is not None else None

    # ---- pull ---------------------------------------------------------------------------

    def _hf_api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.hf_endpoint, token=self.hf_token)

    @property
    def bytes_fetched(self) -> int:
        """What pulls fetched over the network since the daemon started."""
        return self._downloader.bytes_fetched if self._downloader is not None else 0

    def _downloads(self) -> Downloader:
        if self._downloader is None:
            from huggingface_hub.utils import get_session, hf_raise_for_status

            def open_stream(url: str, headers: dict[str, str]):
                return get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60)

            self._downloader = Downloader(open_stream, hf_raise_for_status)
        return self._downloader

    def _headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        return build_hf_headers(token=self.hf_token, library_name="hfollama")

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return self.hf_endpoint or constants.ENDPOINT

    async def pull(self, name: ModelName, modelfile: Modelfile | None,
                   settings: Callable[[PullPlan], Modelfile] | None = None,
                   parent: str = "") -> AsyncIterator[dict[str, Any]]:
        """Ollama's pull progress; the manifest is written last, if every file verified."""
        yield {"status": "pulling manifest"}
        plan = await asyncio.to_thread(plan_pull, name, modelfile, self._hf_api(), self.endpoint)
        downloader, headers = self._downloads(), self._headers()
        entries: list[FileEntry] = []
        for f in plan.files:
            transfer = downloader.subscribe(f, self.hub.blob(f.repo, f.etag), self.hub.partial(f.repo, f.etag),
                                            headers)
            try:
                async for line in watch(f, transfer):
                    yield line
            finally:
                downloader.unsubscribe(transfer)
            entries.append(FileEntry(f.path, f.size, transfer.sha256 or "", f.etag))
        yield {"status": "verifying sha256 digest"}
        for f in plan.files:
            self.hub.link(f.repo, f.commit, f.path, f.etag)
        self.hub.set_ref(plan.repo, plan.revision, plan.commit)
        yield {"status": "writing manifest"}
        final_modelfile = settings(plan) if settings else plan.modelfile
        if plan.license and not final_modelfile.license:
            final_modelfile = final_modelfile.with_overrides(license=plan.license)
        manifest = Manifest(
            source={"kind": "repo", "repo": plan.repo, "revision": plan.revision, "commit": plan.commit,
                    **({"gguf": plan.gguf} if plan.gguf else {})},
            files=tuple(entries),
            settings=final_modelfile.settings(),
            modelfile=plan.modelfile.name.display if plan.from_modelfile and not settings else None,
            parent=parent,
        )
        self.manifests.write(name, manifest)
        yield {"status": "success"}

    def pull_lock(self, name: ModelName) -> asyncio.Lock:
        return self._pull_locks.setdefault(name.key, asyncio.Lock())

    # ---- create, copy, delete -----------------------------------------------------------

    def write(self, name: ModelName, manifest: Manifest) -> None:
        self.manifests.write(name, manifest)

    def link_files(self, files: dict[str, str]) -> tuple[dict[str, Any], tuple[FileEntry, ...]]:
        """A created model's files: a folder of links named as given, to uploaded blobs."""
        entries = []
        for rel, digest in sorted(files.items()):
            path = Path(rel)
            if path.is_absolute() or ".." in path.parts or not rel:
                raise BadRequest("file path must be relative")
            hexd = parse_digest(digest)
            blob = self.blobs.path(hexd)
            if not blob.is_file():
                raise BadRequest(f"blob {digest} not found: upload it with POST /api/blobs/{digest} first")
            check_model_file(rel, blob)
            entries.append(FileEntry(rel, blob.stat().st_size, hexd))
        ident = hashlib.sha256(repr([(e.path, e.sha256) for e in entries]).encode()).hexdigest()[:32]
        folder = self.files_root / ident
        for e in entries:
            target = folder / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                tmp = target.with_name(f".{target.name}.link")
                tmp.unlink(missing_ok=True)
                os.symlink(os.path.relpath(self.blobs.path(e.sha256), target.parent), tmp)
                os.replace(tmp, target)
        ggufs = [e.path for e in entries if e.path.endswith(".gguf")]
        source: dict[str, Any] = {"kind": "files", "id": ident}
        if ggufs:
            source["gguf"] = ggufs[0]
        elif not any(e.path == "config.json" for e in entries):
            raise BadRequest("files must hold a .gguf file, or an HF checkpoint with config.json")
        return source, tuple(entries)

    def has(self, name: ModelName) -> bool:
        """Whether the store holds a manifest for the name, readable or damaged."""
        return self.manifests.exists(name)

    def delete(self, name: ModelName) -> set[str]:
        """Delete a name, and the files no other manifest uses; returns their sha256 (what was
        derived from them can go too: `derived.prune`, once the caller knows what else is in use)."""
        try:
            stored = self.manifests.read(name)
        except DamagedManifest as exc:  # what it used is unknown: the file goes, the files stay
            log.warning("deleting %s, whose manifest is damaged (%s)", name.display, exc)
            self.manifests.delete(name)
            return set()
        if stored is None:
            return set()
        self.manifests.delete(name)
        return self._prune(stored.manifest)

    def _prune(self, removed: Manifest) -> set[str]:
        """Remove what only the deleted manifest used: its repo's or its blobs' files."""
        others = [s.manifest for s in self.manifests.all()]
        s = removed.source
        gone: set[str] = set()
        if s["kind"] == "repo":
            if not any(o.source.get("repo") == s["repo"] for o in others):
                shutil.rmtree(self.hub.repo_dir(s["repo"]), ignore_errors=True)
                gone = {f.sha256 for f in removed.files}
        elif s["kind"] == "files":
            if not any(o.source.get("id") == s["id"] for o in others):
                shutil.rmtree(self.files_root / s["id"], ignore_errors=True)
                used = {f.sha256 for o in others if o.source.get("kind") == "files" for f in o.files}
                for f in removed.files:
                    if f.sha256 not in used:
                        self.blobs.path(f.sha256).unlink(missing_ok=True)
                        gone.add(f.sha256)
        return gone

    def stored(self, name: ModelName) -> StoredManifest | None:
        return self.manifests.read(name)

    @property
    def generation(self) -> int:
        """Changes with every manifest this process writes or deletes (pull, create, copy, delete)."""
        return self.manifests.generation

    def all(self) -> list[StoredManifest]:
        return list(self.manifests.all())


def manifest_for(modelfile: Modelfile, parent: str = "") -> Manifest:
    """A manifest that runs a local-source modelfile (package or path) with its settings."""
    if modelfile.source.kind == "repo":
        raise NotFound(f"model '{modelfile.name.display}' not found")
    return Manifest(source={"kind": modelfile.source.kind, **source_to_json(modelfile.source)},
                    settings=modelfile.settings(), parent=parent)


__all__ = ["Store", "PullError", "manifest_for"]
