"""POST /api/generate and POST /api/chat: parse -> resolve -> schedule -> execute -> stream.

Both endpoints share one path: validation in Ollama's order, the model lease, the prompt,
the runner's chunks mapped to wire lines, and the streaming helper. They differ only in how
the prompt is built and how a chunk looks on the wire (`response` vs `message`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from daemon.api.native import ChatRequest, GenerateRequest, InferenceCommon
from daemon.api.options import Options
from daemon.engine.grammar import Constraint, check_format, entry, harmony_entry, json_answer, tool_call_answer
from daemon.engine.output import HarmonyReader, OutputReader, Part, ThinkingSplitter, ToolCallParser
from daemon.engine.params import GenerationRequest
from daemon.engine.prompt import Cancel, ContextBudget, PromptBuilder, with_images
from daemon.engine.vision import ImageTokens
from daemon.engine.runner import Chunk
from daemon.errors import BadRequest, NotFound
from daemon.names import ModelName
from daemon.registry.catalog import ResolvedModel
from daemon.server.access import RequestRecord, record_of
from daemon.server.state import Services, services
from daemon.server.streaming import respond
from daemon.server.wire import json_response, read_request, utc_now


@dataclass(frozen=True)
class Shape:
    """How one endpoint puts output on the wire."""

    chat: bool

    def line(self, model: str, part: Part | None = None, *, done: bool = False) -> dict[str, Any]:
        part = part or Part()
        line: dict[str, Any] = {"model": model, "created_at": utc_now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": part.content}
            if part.thinking:
                message["thinking"] = part.thinking
            if part.tool_calls:
                message["tool_calls"] = part.tool_calls
            line["message"] = message
        else:
            line["response"] = part.content
            if part.thinking:
                line["thinking"] = part.thinking
        line["done"] = done
        return line

    def reduce(self, lines: list[dict[str, Any]]) -> dict[str, Any]:
        """stream:false: the final line with the text, thinking, tool calls and logprobs of every line."""
        final = dict(lines[-1])
        bodies = [ln["message"] for ln in lines] if self.chat else lines
        text = "".join(b["content"] if self.chat else b["response"] for b in bodies)
        thinking = "".join(b.get("thinking", "") for b in bodies)
        calls = [c for b in bodies for c in b.get("tool_calls", ())]
        if self.chat:
            message = {**final["message"], "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            final["message"] = message
        else:
            final["response"] = text
            if thinking:
                final["thinking"] = thinking
        logprobs = [lp for ln in lines for lp in ln.get("logprobs", ())]
        if logprobs:
            final["logprobs"] = logprobs
        return final


GENERATE, CHAT = Shape(chat=False), Shape(chat=True)


def _resolve(svc: Services, requested: str, chat: bool) -> tuple[ModelName, ResolvedModel]:
    """Ollama's wording: chat says "model is required" for a missing or invalid name,
    generate answers 404 for both; an unknown model is 404 `model 'x' not found`."""
    name = ModelName.parse(requested)
    if not name.is_valid:
        if chat:
            raise BadRequest("model is required")
        raise NotFound(f"model '{requested}' not found")
    try:
        return name, svc.catalog.resolve(name)
    except NotFound:
        raise NotFound(f"model '{requested}' not found") from None


def _check_capabilities(req: InferenceCommon, name: ModelName, model: ResolvedModel, *, chat: bool,
                        needs_insert: bool = False, has_tools: bool = False, has_images: bool = False) -> None:
    caps = model.capabilities
    if "completion" not in caps:
        raise BadRequest(f'"{req.model}" does not support {"chat" if chat else "generate"}')
    if req.think is not None and req.think.enabled and "thinking" not in caps:
        raise BadRequest(f'"{req.model}" does not support thinking')
    if needs_insert and "insert" not in caps:
        raise BadRequest(f"{name.full} does not support insert")
    if has_tools and "tools" not in caps:
        raise BadRequest(f"{name.full} does not support tools")
    if has_images and "vision" not in caps:
        raise BadRequest(f"{name.full} does not support vision (image input)")
    check_format(_format_of(req))  # before the model loads: a 400, not an in-stream error


def _format_of(req: InferenceCommon) -> Any:
    return None if req.format in (None, "", "null") else req.format


def _final_line(shape: Shape, model: str, chunk: Chunk, started_ns: int, load_ns: int,
                context: tuple[int, ...] | None) -> dict[str, Any]:
    line = shape.line(model, done=True)
    line["done_reason"] = chunk.done_reason
    if context is not None:
        line["context"] = list(context)
    line.update({
        "total_duration": time.perf_counter_ns() - started_ns,
        "load_duration": load_ns,
        "prompt_eval_count": chunk.prompt_eval_count,
        "prompt_eval_duration": chunk.prompt_eval_duration_ns,
        "eval_count": chunk.eval_count,
        "eval_duration": chunk.eval_duration_ns,
    })
    return line


async def _lines(shape: Shape, model: str, chunks: AsyncIterator[Chunk], reader: OutputReader, started_ns: int,
                 load_ns: int, with_context: bool, record: RequestRecord) -> AsyncIterator[dict[str, Any]]:
    async for chunk in chunks:
        if chunk.done:
            record.generation(chunk.prompt_eval_count + chunk.prompt_cached_count, chunk.prompt_cached_count,
                              chunk.eval_count, chunk.eval_duration_ns / 1e9)
            rest = reader.flush()
            if rest:
                record.first_token()
                yield shape.line(model, rest)
            yield _final_line(shape, model, chunk, started_ns, load_ns, chunk.output_ids if with_context else None)
            return
        part = reader.push(chunk.text)
        if not part and not chunk.logprobs:
            continue  # held back: it may be the start of a marker
        record.first_token()
        line = shape.line(model, part)
        if chunk.logprobs:
            line["logprobs"] = chunk.logprobs
        yield line


@dataclass(frozen=True)
class OutputPlan:
    """How this request's output is read and constrained: thinking split off (where the
    model thinks), tool calls parsed (where tools were sent), and the grammar of `format` or
    of a required tool call."""

    thinking: str | None = None  # None | "inside" (the prompt opened the block) | "optional"
    keep_thinking: bool = True
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    format: Any = None

    def reader(self, model: ResolvedModel) -> OutputReader | HarmonyReader:
        if model.tool_dialect == "harmony":  # its channels carry the thinking and the calls
            return HarmonyReader(keep_thinking=self.keep_thinking)
        splitter = None
        if self.thinking is not None:
            splitter = ThinkingSplitter(inside=self.thinking == "inside", keep=self.keep_thinking)
        parser = None
        if self.tools:
            parser = ToolCallParser(model.tool_dialect, [(t.get("function") or {}).get("name", "") for t in self.tools])
        return OutputReader(splitter, parser)

    @property
    def requires_tool_call(self) -> bool:
        return bool(self.tools and self.tool_choice not in (None, "auto", "none"))

    @property
    def constrained(self) -> bool:
        """Whether `constraint` may compile a grammar (else it is None, at no cost)."""
        return self.format is not None or self.requires_tool_call

    def constraint(self, model: ResolvedModel, runtime: Any) -> Constraint | None:
        """Compiled off the event loop (the tokenizer's grammar tables build once per model)."""
        answer = None
        literal = runtime.grammars.literal
        if self.format is not None:
            answer = json_answer(self.format)
        elif self.requires_tool_call:
            only = None
            if isinstance(self.tool_choice, dict):
                only = (self.tool_choice.get("function") or {}).get("name") or self.tool_choice.get("name")
            answer = tool_call_answer(model.tool_dialect, self.tools, only, literal)
        if answer is None:
            return None
        if model.tool_dialect == "harmony":  # the answer as its final message, or its call's
            return runtime.grammars.compile(harmony_entry(answer, self.format is None, literal)).matcher()
        # the grammar lets a thinking model think first only while its thinking is shown
        thinking = self.thinking if self.keep_thinking else ("inside" if self.thinking == "inside" else None)
        return runtime.grammars.compile(entry(answer, thinking, literal)).matcher()


def _output_plan(req: InferenceCommon, model: ResolvedModel, prompt_tail: str, tools: tuple = (),
                 tool_choice: Any = None) -> OutputPlan:
    thinking = None
    keep = True
    if "thinking" in model.capabilities:
        keep = req.think is None or req.think.enabled  # thinking models think by default
        opened = prompt_tail.rstrip().endswith("<think>")
        thinking = "inside" if opened else "optional"
    return OutputPlan(thinking, keep, tools, tool_choice, _format_of(req))


# the prompt's ids from the builder, the budget, a cancel flag and the request's images (in order)
PromptFn = Callable[[PromptBuilder, ContextBudget, Cancel, list[ImageTokens]], list[int]]
# Turns the native wire lines into the HTTP answer: NDJSON here, OpenAI's shapes for /v1.
Responder = Callable[[AsyncIterator[dict[str, Any]]], Awaitable[web.StreamResponse]]


async def _serve(request: web.Request, req: InferenceCommon, shape: Shape, name: ModelName, model: ResolvedModel,
                 options: Options, started_ns: int, empty: bool, build_prompt: PromptFn,
                 render_only: Callable[[PromptBuilder], str], with_context: bool,
                 responder: Responder | None, tools: tuple[dict[str, Any], ...] = (),
                 tool_choice: Any = None, images: tuple[str, ...] = ()) -> web.StreamResponse:
    svc = services(request)
    num_ctx = options.num_ctx or None
    record = record_of(request)
    record.model = model.name.display
    async with svc.models.acquire(model, num_ctx, req.keep_alive_ns) as runtime:
        load_ns = time.perf_counter_ns() - started_ns
        if empty:
            line = shape.line(req.model, done=True)
            line["done_reason"] = "load"
            return await _answer_single(line, responder)
        if req.debug_render_only:
            rendered = await asyncio.to_thread(render_only, runtime.prompts)
            line = {"model": req.model, "created_at": utc_now(), "done": False,
                    "_debug_info": {"rendered_template": rendered, "image_count": len(images)}}
            if shape.chat:
                line["message"] = {"role": "", "content": ""}
            else:
                line["response"] = ""
            return json_response(line)
        budget = ContextBudget(num_ctx=min(options.num_ctx or runtime.num_ctx, runtime.num_ctx),
                               num_keep=options.num_keep, num_predict=options.num_predict, truncate=req.truncate)
        vision = runtime.vision
        held: list[int] = []  # images whose features stay until this request is done
        try:
            tokens: list[ImageTokens] = []
            if images:
                tokens, held = await runtime.image_tokens(images)
            prompt_ids = await _build(build_prompt, runtime.prompts, budget, request.content_length or 0, tokens)
            spans: tuple[tuple[int, int], ...] = ()
            if vision is not None:
                held += vision.pin(prompt_ids)  # a `context`'s images too (or its 400)
                spans = vision.spans(prompt_ids)
            tail_ids = [t for t in prompt_ids[-4:] if vision is None or t < vision.first_virtual]
            tail = runtime.loaded.tokenizer.decode(tail_ids, skip_special_tokens=False)
            plan = _output_plan(req, model, tail, tools, tool_choice)
            # no thread hop for a request without a grammar: a burst of them would convoy (_build)
            constraint = await asyncio.to_thread(plan.constraint, model, runtime) if plan.constrained else None
            generation = GenerationRequest.from_options(prompt_ids, options, logprobs=req.logprobs,
                                                        top_logprobs=req.top_logprobs, constraint=constraint,
                                                        image_spans=spans)
            chunks = runtime.runner.generate(generation)
            lines = _lines(shape, req.model, chunks, plan.reader(model), started_ns, load_ns, with_context, record)
            if responder is not None:
                return await responder(lines)
            return await respond(request, lines, stream=req.stream, reduce=shape.reduce)
        finally:
            if held:
                vision.unpin(held)


# Requests with bodies up to this size build their prompt on the event loop (well under a
# millisecond of template and tokenizer for 32 KB). Larger ones go to a worker thread, which the
# loop's other requests would otherwise wait behind; small ones do not, because a burst of them
# on threads convoys on the GIL: 32 requests sharing a 2,000-token system prompt reached the
# runner together only after 85-95 ms on the H200's host, each build's 0.3 ms of work spread
# over the whole burst.
INLINE_BUILD_BYTES = 32 << 10


async def _build(build_prompt: PromptFn, prompts: PromptBuilder, budget: ContextBudget, body_bytes: int,
                 images: list[ImageTokens]) -> list[int]:
    """The prompt: on the loop for a small request, else on a worker thread that stops when
    the client goes away (a thread cannot be cancelled: it is told to stop, and does at its
    next render)."""
    cancel = Cancel()
    if 0 < body_bytes <= INLINE_BUILD_BYTES:
        return build_prompt(prompts, budget, cancel, images)
    try:
        return await asyncio.to_thread(build_prompt, prompts, budget, cancel, images)
    except asyncio.CancelledError:
        cancel.set()
        raise


async def _single(line: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield line


async def _answer_single(line: dict[str, Any], responder: Responder | None) -> web.StreamResponse:
    """Load and unload answer one object, even on a streaming request (as Ollama)."""
    if responder is not None:
        return await responder(_single(line))
    return json_response(line)


def _unload_line(shape: Shape, requested: str) -> dict[str, Any]:
    line = shape.line(requested, done=True)
    line["done_reason"] = "unload"
    return line


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    return await run_generate(request, await read_request(request, GenerateRequest.from_body), started)


async def run_generate(request: web.Request, req: GenerateRequest, started: int,
                       responder: Responder | None = None) -> web.StreamResponse:
    """Everything /api/generate does after parsing; /v1/completions calls it too."""
    svc = services(request)
    name, model = _resolve(svc, req.model, chat=False)
    if not req.prompt and req.keep_alive_ns == 0:
        await svc.models.unload(model)
        return await _answer_single(_unload_line(GENERATE, req.model), responder)
    if req.raw and (req.template or req.system or req.context is not None):
        raise BadRequest("raw mode does not support template, system, or context")
    _check_capabilities(req, name, model, chat=False, needs_insert=bool(req.suffix), has_images=bool(req.images))
    options = Options.layered(model.modelfile.parameters, req.options)

    def build(prompts: PromptBuilder, budget: ContextBudget, cancel: Cancel, images: list[ImageTokens]) -> list[int]:
        return prompts.generate_ids(req.prompt, budget, system=req.system, template=req.template or None,
                                    context=req.context, raw=req.raw, suffix=req.suffix, think=_think(req),
                                    think_level=_think_level(req), cancel=cancel, images=images)

    def render_only(prompts: PromptBuilder) -> str:
        if req.raw:
            return req.prompt
        return prompts.render(prompts.generate_messages(req.prompt, req.system), template=req.template or None,
                              think=_think(req))

    return await _serve(request, req, GENERATE, name, model, options, started, not req.prompt, build, render_only,
                        with_context=not req.raw, responder=responder, images=req.images)


def _think(req: InferenceCommon) -> bool | None:
    return None if req.think is None else req.think.enabled


def _think_level(req: InferenceCommon) -> str | None:
    return None if req.think is None else req.think.level


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    return await run_chat(request, await read_request(request, ChatRequest.from_body), started)


async def run_chat(request: web.Request, req: ChatRequest, started: int,
                   responder: Responder | None = None) -> web.StreamResponse:
    """Everything /api/chat does after parsing; /v1/chat/completions calls it too."""
    svc = services(request)
    name, model = _resolve(svc, req.model, chat=True)
    if not req.messages and req.keep_alive_ns == 0:
        await svc.models.unload(model)
        return await _answer_single(_unload_line(CHAT, req.model), responder)
    _check_capabilities(req, name, model, chat=True, has_tools=bool(req.tools),
                        has_images=any(m.images for m in req.messages))
    options = Options.layered(model.modelfile.parameters, req.options)
    messages = [m.to_template_dict() for m in req.messages]
    tools = [dict(t) for t in req.tools] or None

    counts = [len(m.images) for m in req.messages]

    def build(prompts: PromptBuilder, budget: ContextBudget, cancel: Cancel, images: list[ImageTokens]) -> list[int]:
        ends = list(itertools.accumulate(counts, initial=0))
        placed = [with_images(m, images[a:b]) for m, a, b in zip(messages, ends, ends[1:])]
        return prompts.chat_ids(prompts.conversation(placed), budget, tools=tools, think=_think(req),
                                think_level=_think_level(req), cancel=cancel)

    def render_only(prompts: PromptBuilder) -> str:
        return prompts.render(prompts.conversation(messages), tools=tools, think=_think(req))

    return await _serve(request, req, CHAT, name, model, options, started, not req.messages, build, render_only,
                        with_context=False, responder=responder, tools=tuple(tools or ()),
                        tool_choice=req.tool_choice, images=tuple(i for m in req.messages for i in m.images))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
