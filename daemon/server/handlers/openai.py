"""The OpenAI-compatible endpoints under /v1: each translates its body into a native request,
runs the native handler's path, and shapes the native lines as OpenAI's objects (SSE when
streaming). Errors become OpenAI's error objects in the error middleware."""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping

from aiohttp import web

from daemon.api.openai import (
    ChatChunks, ChatCompletionRequest, CompletionChunks, CompletionRequest, EmbeddingRequest, ReplyIds,
    StreamSettings, chat_completion, embedding_list, model_object, text_completion,
)
from daemon.engine.embed import l2_normalize
from daemon.errors import NotFound
from daemon.names import ModelName
from daemon.server.handlers.embed import embed_texts, resolve_for_embedding
from daemon.server.handlers.inference import Responder, run_chat, run_generate
from daemon.server.state import services
from daemon.server.streaming import SSE, respond
from daemon.server.wire import json_response, read_request

Lines = AsyncIterator[dict[str, Any]]


def _responder(request: web.Request, settings: StreamSettings,
               fold: Callable[[list[dict[str, Any]]], dict[str, Any]],
               convert: Callable[[Mapping[str, Any]], Iterator[dict[str, Any]]]) -> Responder:
    async def answer(lines: Lines) -> web.StreamResponse:
        if not settings.stream:
            return await respond(request, lines, stream=False, reduce=fold)
        return await respond(request, _converted(lines, convert), stream=True, framing=SSE)

    return answer


async def _converted(lines: Lines, convert: Callable[[Mapping[str, Any]], Iterator[dict[str, Any]]]) -> Lines:
    async with contextlib.aclosing(lines):  # closing us closes (and cancels) the generation
        async for line in lines:
            for event in convert(line):
                yield event


async def _generation(request: web.Request, req: ChatCompletionRequest | CompletionRequest, prefix: str,
                      chunks: type[ChatChunks] | type[CompletionChunks],
                      fold: Callable[[ReplyIds, list[dict[str, Any]]], dict[str, Any]],
                      run: Callable[..., Awaitable[web.StreamResponse]], started: int) -> web.StreamResponse:
    """The native run, with OpenAI's shapes on the way out."""
    ids = ReplyIds(req.native.model, prefix)
    converter = chunks(ids, req.stream.include_usage)
    responder = _responder(request, req.stream, lambda lines: fold(ids, lines), converter.convert)
    return await run(request, req.native, started, responder)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    req = await read_request(request, ChatCompletionRequest.from_body)
    return await _generation(request, req, "chatcmpl", ChatChunks, chat_completion, run_chat, started)


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    req = await read_request(request, CompletionRequest.from_body)
    return await _generation(request, req, "cmpl", CompletionChunks, text_completion, run_generate, started)


async def list_models(request: web.Request) -> web.Response:
    models = services(request).catalog.list_local()
    data = [model_object(m.name.display, m.name.namespace, m.modified_at) for m in models]
    return json_response({"object": "list", "data": data})  # [] rather than Ollama's null


async def retrieve_model(request: web.Request) -> web.Response:
    requested = request.match_info["model"]
    name = ModelName.parse(requested)
    try:
        model = services(request).catalog.resolve(name) if name.is_valid else None
    except NotFound:
        model = None
    if model is None:
        raise NotFound(f"model '{requested}' not found")
    return json_response(model_object(model.name.display, model.name.namespace, model.modified_at))


async def embeddings(request: web.Request) -> web.Response:
    req = await read_request(request, EmbeddingRequest.from_body)
    model = resolve_for_embedding(request, req.model, missing_is_bad_request=True)
    vectors, tokens = await embed_texts(request, model, list(req.inputs), True, req.options, req.keep_alive_ns)
    normalized = [l2_normalize(v, req.dimensions) for v in vectors]
    return json_response(embedding_list(req.model, normalized, tokens, req.base64))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    # Namespaced names (user/model) are retrievable too, unlike in Ollama.
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_post("/v1/embeddings", embeddings)
