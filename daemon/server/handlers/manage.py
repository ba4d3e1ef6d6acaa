"""The store over HTTP: pull, push, copy, delete, create, blobs (Ollama §2.9-2.16)."""

from __future__ import annotations

import hashlib
import json
from typing import Any, AsyncIterator

from aiohttp import web

from daemon.api.native import CopyRequest, CreateRequest, DeleteRequest, PullRequest
from daemon.errors import BadRequest, ModelDamaged, NotFound, NotImplementedFeature
from daemon.names import ModelName
from daemon.registry.catalog import ResolvedModel
from daemon.registry.modelfile import (Modelfile, ModelfileError, Quantization, Source, parse_parameters,
                                       parse_quantization, parse_source)
from daemon.server.wire import read_request
from daemon.server.state import Services, services
from daemon.server.streaming import respond
from daemon.store.blobs import parse_digest
from daemon.store.manifests import FileEntry, Manifest
from daemon.store.pull import HUB_HOSTS
from daemon.store.store import manifest_for

# Ollama's `quantize` values mapped onto load-time quantization.
QUANTIZE = {"q4_0": "nf4", "q4_1": "nf4", "q4_k_m": "nf4", "q4_k_s": "nf4", "nf4": "nf4", "fp4": "fp4",
            "q8_0": "int8", "int8": "int8"}


def _valid_name(text: str, message: str) -> ModelName:
    name = ModelName.parse(text)
    if not text.strip() or not name.is_valid:
        raise BadRequest(message)
    return name


def is_pullable(svc: Services, name: ModelName) -> bool:
    modelfile = svc.catalog.registry.find(name)
    return (modelfile is not None and modelfile.source.kind == "repo") or name.host.lower() in HUB_HOSTS


async def _local_pull(resolved: ResolvedModel) -> AsyncIterator[dict[str, Any]]:
    """Pulling a model whose files are already here (the embedded default): nothing moves."""
    yield {"status": "pulling manifest"}
    for path in resolved.location.files():
        digest = resolved.file_digests.get(path.name) or resolved.digest
        size = path.stat().st_size
        yield {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": size, "completed": size}
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    yield {"status": "success"}


async def pull(request: web.Request) -> web.StreamResponse:
    req = await read_request(request, PullRequest.from_body)
    name = _valid_name(req.model, "invalid model name")
    svc = services(request)
    modelfile = svc.catalog.registry.find(name)
    if not is_pullable(svc, name) and not svc.store.has(name):
        try:
            resolved = svc.catalog.resolve(name)
        except NotFound:
            resolved = None
        if resolved is not None:
            return await respond(request, _local_pull(resolved), stream=req.stream)
    events = svc.metrics.counted_pull(svc.store.pull(name, modelfile))
    return await respond(request, events, stream=req.stream)


async def push(request: web.Request) -> web.Response:
    if not (await read_request(request, PullRequest.from_body)).model:
        raise BadRequest("model is required")
    raise NotImplementedFeature("push is not supported: hfollama pulls from the Hugging Face Hub and has no registry "
                                "to push to")


def manifest_of(svc: Services, resolved: ResolvedModel, parent: str = "") -> Manifest:
    """The manifest that reproduces a resolved model (for copy and create)."""
    stored = svc.store.stored(resolved.name)
    if stored is not None and stored.manifest.modelfile is None:
        base = stored.manifest
    else:
        base = svc.store.manifest_holding(resolved.modelfile) or manifest_for(resolved.modelfile)
    files = base.files or tuple(  # a local source: list its weights, for sizes and layer lines
        FileEntry(path.name, path.stat().st_size, resolved.file_digests[path.name])
        for path in resolved.location.files() if path.name in resolved.file_digests)
    return Manifest(source=base.source, files=files, settings=resolved.modelfile.settings(), parent=parent)


async def copy(request: web.Request) -> web.Response:
    req = await read_request(request, CopyRequest.from_body)
    src = ModelName.parse(req.source)
    if not req.source.strip() or not src.is_valid:
        raise BadRequest(f'source "{req.source}" is invalid')
    dst = ModelName.parse(req.destination)
    if not req.destination.strip() or not dst.is_valid:
        raise BadRequest(f'destination "{req.destination}" is invalid')
    svc = services(request)
    try:
        resolved = svc.catalog.resolve(src)
    except NotFound:
        raise NotFound(f'model "{req.source}" not found') from None
    stored = svc.store.stored(src)
    manifest = stored.manifest if stored is not None else manifest_of(svc, resolved)
    svc.store.write(dst, manifest)
    return web.Response(status=200)


async def delete(request: web.Request) -> web.Response:
    req = await read_request(request, DeleteRequest.from_body)
    if not req.model.strip():
        raise BadRequest("model is required")
    name = ModelName.parse(req.model)
    if not name.is_valid:
        raise BadRequest(f'name "{req.model}" is invalid')
    svc = services(request)
    try:
        resolved = svc.catalog.resolve(name)
    except (NotFound, ModelDamaged):  # a damaged model cannot be loaded, and can be deleted
        resolved = None
    if not svc.store.has(name):
        if resolved is not None:
            raise BadRequest(f"{name.display} is defined by a modelfile ({resolved.modelfile.origin}) and ships "
                             "with its files; remove it from your modelfiles instead")
        raise NotFound(f"model '{req.model}' not found")
    removed = svc.store.delete(name)
    listed = svc.catalog.list_local()
    # what was made from the deleted files (a converted GGUF, quantized weights) goes too,
    # unless another model has the same files (an upload of the embedded GGUF)
    svc.store.derived.prune(removed - {d for m in listed for d in m.file_digests.values()})
    # Ollama leaves a deleted model running; we unload it, unless another name (a copy, an
    # alias) is the same model and still uses it
    if resolved is not None:
        other = next((m for m in listed if m.digest == resolved.digest), None)
        if other is None:
            await svc.models.unload(resolved)
        else:
            svc.models.relabel(other)
    return web.Response(status=200)


def _settings(req: CreateRequest, base: Modelfile) -> Modelfile:
    """The base model's settings with the request's overrides."""
    try:
        parameters = dict(base.parameters)
        if req.parameters is not None:
            parameters.update(parse_parameters("request", "parameters", req.parameters))
        quantization = base.quantization
        if req.quantization is not None:
            quantization = parse_quantization("request", "quantization", req.quantization)
        elif req.quantize:
            mode = QUANTIZE.get(req.quantize.lower())
            if mode is None:
                raise BadRequest(f"unsupported quantization type {req.quantize}: use one of "
                                 f"{', '.join(sorted(QUANTIZE))}")
            quantization = Quantization(mode=mode, double_quant=mode != "int8")
    except ModelfileError as exc:
        raise BadRequest(f"{exc.key}: {exc.problem}") from None
    changes: dict[str, Any] = {"parameters": parameters, "quantization": quantization}
    if req.system is not None:
        changes["system"] = req.system
    if req.template is not None:
        changes["template"] = req.template or None
    if req.license is not None:
        changes["license"] = req.license
    if req.messages is not None:
        changes["messages"] = req.messages
    return base.with_overrides(**changes)


async def create(request: web.Request) -> web.StreamResponse:
    req = await read_request(request, CreateRequest.from_body)
    name = _valid_name(req.model, "invalid model name")
    svc = services(request)
    if req.adapters:
        raise BadRequest("adapters are not supported")
    if not req.base and not req.files and not req.source:
        raise BadRequest("neither 'from' or 'files' was specified")
    for key, digest in req.files.items():
        if key.startswith("/") or ".." in key.split("/") or not key:
            raise BadRequest("file path must be relative")
        parse_digest(digest)
    if req.source is not None:
        try:
            source = parse_source("request", "source", req.source)
        except ModelfileError as exc:
            raise BadRequest(f"{exc.key}: {exc.problem}") from None
        base = Modelfile(name=name, source=source)
        _settings(req, base)  # validate before the stream starts
        return await respond(request, _create_from_source(svc, name, req, base), stream=req.stream)
    if req.files:
        base = Modelfile(name=name, source=Source(kind="path", path="files"))
        return await respond(request, _create_from_files(svc, name, req, _settings(req, base)), stream=req.stream)
    base_name = ModelName.parse(req.base)
    if not base_name.is_valid:
        raise BadRequest(f"invalid model name {req.base!r} in from")
    try:
        resolved = svc.catalog.resolve(base_name)
    except NotFound:
        if not is_pullable(svc, base_name):
            raise NotFound(f"model '{req.base}' not found") from None
        resolved = None
    return await respond(request, _create_from_model(svc, name, req, base_name, resolved), stream=req.stream)


async def _create_from_model(svc: Services, name: ModelName, req: CreateRequest, base_name: ModelName,
                             resolved: ResolvedModel | None) -> AsyncIterator[dict[str, Any]]:
    if resolved is None:  # as `ollama create` does: pull a missing base first
        async for line in svc.store.pull(base_name, svc.catalog.registry.find(base_name)):
            if line.get("status") != "success":
                yield line
        resolved = svc.catalog.resolve(base_name)
    modelfile = _settings(req, resolved.modelfile)
    manifest = manifest_of(svc, resolved, parent=resolved.name.display)
    manifest = Manifest(source=manifest.source, files=manifest.files, settings=modelfile.settings(),
                        parent=manifest.parent)
    async for line in _finish(svc, name, manifest):
        yield line


async def _create_from_files(svc: Services, name: ModelName, req: CreateRequest,
                             modelfile: Modelfile) -> AsyncIterator[dict[str, Any]]:
    source, entries = svc.store.link_files(dict(req.files))
    if source.get("gguf"):
        yield {"status": "parsing GGUF"}
    manifest = Manifest(source=source, files=entries, settings=modelfile.settings())
    async for line in _finish(svc, name, manifest):
        yield line


async def _create_from_source(svc: Services, name: ModelName, req: CreateRequest,
                              base: Modelfile) -> AsyncIterator[dict[str, Any]]:
    async for line in svc.store.pull(name, base, settings=lambda plan: _settings(req, plan.modelfile)):
        yield line


async def _finish(svc: Services, name: ModelName, manifest: Manifest) -> AsyncIterator[dict[str, Any]]:
    for f in manifest.files:
        yield {"status": f"using existing layer sha256:{f.sha256}"}
    settings_digest = hashlib.sha256(json.dumps(manifest.settings, sort_keys=True).encode()).hexdigest()
    yield {"status": f"creating new layer sha256:{settings_digest}"}
    yield {"status": "writing manifest"}
    svc.store.write(name, manifest)
    yield {"status": "success"}


async def head_blob(request: web.Request) -> web.Response:
    given = request.match_info["digest"]
    digest = parse_digest(given)
    if not services(request).store.blobs.exists(digest):
        raise NotFound(f'blob "{given}" not found')
    return web.Response(status=200)


async def post_blob(request: web.Request) -> web.Response:
    given = request.match_info["digest"]
    digest = parse_digest(given)
    blobs = services(request).store.blobs
    if blobs.exists(digest):
        return web.Response(status=200)
    await blobs.write(digest, given, request.content.iter_chunked(1 << 20))
    return web.Response(status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/pull", pull)
    app.router.add_post("/api/push", push)
    app.router.add_post("/api/copy", copy)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/create", create)
    app.router.add_route("HEAD", "/api/blobs/{digest}", head_blob)
    app.router.add_post("/api/blobs/{digest}", post_blob)
