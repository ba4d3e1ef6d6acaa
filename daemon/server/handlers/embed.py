"""POST /api/embed (L2-normalized, `dimensions`, `truncate`) and the legacy /api/embeddings
(the model's own output). Any model embeds: encoder models through their pooling, generate
models by their mean-pooled last hidden state, as Ollama allows."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from daemon.api.native import EmbeddingsRequest, EmbedRequest
from daemon.api.options import Options
from daemon.engine.embed import l2_normalize
from daemon.errors import BadRequest, NotFound
from daemon.names import ModelName
from daemon.registry.catalog import ResolvedModel
from daemon.server.access import record_of
from daemon.server.state import services
from daemon.server.wire import json_response, read_request


def resolve_for_embedding(request: web.Request, requested: str, missing_is_bad_request: bool) -> ResolvedModel:
    """Ollama: /api/embed answers 404 `model '' not found` for no model, /api/embeddings 400
    `model is required`; an unknown model is 404 `model "x" not found, try pulling it first`."""
    name = ModelName.parse(requested)
    if not requested.strip() or not name.is_valid:
        if missing_is_bad_request:
            raise BadRequest("model is required")
        raise NotFound(f"model '{requested}' not found")
    try:
        return services(request).catalog.resolve(name)
    except NotFound:
        raise NotFound(f'model "{requested}" not found, try pulling it first') from None


async def embed_texts(request: web.Request, model: ResolvedModel, texts: list[str], truncate: bool,
                      options: Any, keep_alive_ns: int | None) -> tuple[Any, int]:
    """Raw vectors (the model's pipeline) and the token count; loads the model for no text."""
    num_ctx = Options.layered(model.modelfile.parameters, options).num_ctx or None
    record = record_of(request)
    record.model = model.name.display
    async with services(request).models.acquire(model, num_ctx, keep_alive_ns) as runtime:
        if not texts:
            return None, 0
        result = await runtime.embed(texts, truncate)
        record.prompt_tokens = sum(result.token_counts)
        return result.vectors, record.prompt_tokens


async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter_ns()
    req = await read_request(request, EmbedRequest.from_body)
    model = resolve_for_embedding(request, req.model, missing_is_bad_request=False)
    load_start = time.perf_counter_ns()
    vectors, tokens = await embed_texts(request, model, list(req.inputs), req.truncate, req.options,
                                        req.keep_alive_ns)
    if vectors is None:
        return json_response({"model": req.model, "embeddings": []})
    body: dict[str, Any] = {
        "model": req.model,
        "embeddings": [l2_normalize(v, req.dimensions) for v in vectors],
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": load_start - started,
        "prompt_eval_count": tokens,
    }
    return json_response(body)


async def embeddings(request: web.Request) -> web.Response:
    req = await read_request(request, EmbeddingsRequest.from_body)
    model = resolve_for_embedding(request, req.model, missing_is_bad_request=True)
    vectors, _ = await embed_texts(request, model, [req.prompt] if req.prompt else [], True, req.options,
                                   req.keep_alive_ns)
    return json_response({"embedding": vectors[0] if vectors else []})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
