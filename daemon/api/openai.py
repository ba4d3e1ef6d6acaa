"""The OpenAI-compatible layer's values (Go: openai/openai.go): /v1 bodies translated into
native requests, and native reply lines translated back into OpenAI's objects.

Everything here is pure: the handlers run the native path with these translations on each
side, so /v1 and /api share one generation path. Where Ollama's layer is weak we do better:
`max_completion_tokens` is honoured, `tool_choice: "none"` drops the tools, `options` and
`keep_alive` pass through (so num_ctx can be set over /v1).
"""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from daemon.api.decode import ArrayOf, Struct, decode_body
from daemon.api.native import (
    MAX_MESSAGES, ChatRequest, GenerateRequest, Message, Think, check_base64_image, checked_top_logprobs,
)
from daemon.durations import parse_keep_alive
from daemon.errors import BadRequest

FINGERPRINT = "fp_ollama"

_CHAT_SPEC = Struct("ChatCompletionRequest", {
    "model": "string",
    "messages": ArrayOf("map[string]interface {}", MAX_MESSAGES, "messages"),
    "stream": "bool",
    "stream_options": "map[string]interface {}",
    "max_tokens": "int",
    "max_completion_tokens": "int",
    "seed": "int",
    "stop": "interface {}",
    "temperature": "float32",
    "frequency_penalty": "float32",
    "presence_penalty": "float32",
    "top_p": "float32",
    "response_format": "map[string]interface {}",
    "tools": ArrayOf("map[string]interface {}"),
    "tool_choice": "interface {}",
    "reasoning": "map[string]interface {}",
    "reasoning_effort": "string",
    "logprobs": "bool",
    "top_logprobs": "int",
    "keep_alive": "interface {}",
    "options": "map[string]interface {}",
})
_COMPLETION_SPEC = Struct("CompletionRequest", {
    "model": "string",
    "prompt": "string",
    "suffix": "string",
    "stream": "bool",
    "stream_options": "map[string]interface {}",
    "max_tokens": "int",
    "seed": "int",
    "stop": "interface {}",
    "temperature": "float32",
    "frequency_penalty": "float32",
    "presence_penalty": "float32",
    "top_p": "float32",
    "logprobs": "int",
    "keep_alive": "interface {}",
    "options": "map[string]interface {}",
})
_EMBEDDING_SPEC = Struct("EmbedRequest", {
    "model": "string",
    "input": "interface {}",
    "dimensions": "int",
    "encoding_format": "string",
    "keep_alive": "interface {}",
    "options": "map[string]interface {}",
})

# reasoning_effort -> native think level; "none" turns thinking off.
_EFFORTS = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "max": "max",
            "xhigh": "max", "ultra": "max"}


@dataclass(frozen=True)
class StreamSettings:
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StreamSettings":
        return cls(stream=bool(d.get("stream")),
                   include_usage=bool((d.get("stream_options") or {}).get("include_usage")))


def _stop_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise BadRequest(f"invalid type for 'stop' field: {_go_kind(item)}")
        return list(value)
    raise BadRequest(f"invalid type for 'stop' field: {_go_kind(value)}")


def _go_kind(value: Any) -> str:
    return {bool: "bool", int: "float64", float: "float64", dict: "map[string]interface {}",
            list: "[]interface {}"}.get(type(value), "string")


def _sampling_options(d: Mapping[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """OpenAI's sampling fields as native options. OpenAI's own defaults (temperature and
    top_p 1.0) apply when absent, as in Ollama; explicit `options` (an hfollama extension,
    e.g. num_ctx) sit underneath the OpenAI fields."""
    options: dict[str, Any] = dict(d.get("options") or {})
    stop = _stop_list(d.get("stop"))
    if stop is not None:
        options["stop"] = stop
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    options["temperature"] = d["temperature"] if d.get("temperature") is not None else 1.0
    options["top_p"] = d["top_p"] if d.get("top_p") else 1.0  # Ollama: top_p 0 means 1.0
    for key in ("seed", "frequency_penalty", "presence_penalty"):
        if d.get(key) is not None:
            options[key] = d[key]
    return options


def _format(response_format: Mapping[str, Any] | None) -> Any:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format json_schema requires a 'schema' object")
        return schema
    if kind in (None, "text"):
        return None
    raise BadRequest(f"invalid response_format type: {kind}")


def _think(d: Mapping[str, Any]) -> Think | None:
    effort = d.get("reasoning_effort") or (d.get("reasoning") or {}).get("effort")
    if effort is None:
        return None
    if effort not in _EFFORTS:
        raise BadRequest(f"invalid reasoning value: '{effort}' (must be \"none\", \"minimal\", \"low\", "
                         f"\"medium\", \"high\", or \"max\")")
    level = _EFFORTS[effort]
    return Think(enabled=False) if level is False else Think(enabled=True, level=level)


_IMAGE_PREFIXES = ("data:image/jpeg;base64,", "data:image/jpg;base64,", "data:image/png;base64,",
                   "data:image/webp;base64,", "data:;base64,")


def _image(part: Mapping[str, Any]) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise BadRequest("invalid image input")
    for prefix in _IMAGE_PREFIXES:
        if url.startswith(prefix):
            data = url[len(prefix):]
            check_base64_image(data)
            return data
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
    raise BadRequest("invalid image input")


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Assistant tool calls: OpenAI's JSON-string arguments become objects."""
    out = []
    for i, call in enumerate(calls or ()):
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise BadRequest("invalid tool call arguments") from None
        if not isinstance(arguments, dict):
            raise BadRequest("invalid tool call arguments")
        out.append({"id": call.get("id") or "", "function": {"index": i, "name": function.get("name") or "",
                                                             "arguments": arguments}})
    return out


def _messages(raw: list[Mapping[str, Any]]) -> list[Message]:
    """OpenAI messages as native ones: each content part becomes its own message."""
    if not raw:
        raise BadRequest("[] is too short - 'messages'")
    tool_names: dict[str, str] = {}
    out: list[Message] = []
    for m in raw:
        if not isinstance(m, dict):
            raise BadRequest("invalid message format")
        role = (m.get("role") or "").lower()
        content = m.get("content")
        calls = _tool_calls(m.get("tool_calls"))
        for call in calls:
            if call["id"]:
                tool_names[call["id"]] = call["function"]["name"]
        tool_name = m.get("name") or tool_names.get(m.get("tool_call_id") or "", "") if role == "tool" else ""
        common = dict(role=role, thinking=m.get("reasoning") or m.get("reasoning_content") or "",
                      tool_name=tool_name, tool_call_id=m.get("tool_call_id") or "")
        if content is None:
            if not calls:
                raise BadRequest("invalid message content type: <nil>")
            out.append(Message(content="", tool_calls=tuple(calls), **common))
        elif isinstance(content, str):
            out.append(Message(content=content, tool_calls=tuple(calls), **common))
        elif isinstance(content, list):
            texts, images = [], []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text") or "")
                elif kind == "image_url":
                    images.append(_image(part))
                else:
                    raise BadRequest(f"invalid message part type: {kind}")
            if images:
                # one message holding its pictures and its text, as the model's chat template
                # places them (Ollama splits the parts into messages of their own, which renders
                # an image turn apart from the question about it)
                out.append(Message(content="\n".join(texts), images=tuple(images), **common))
            else:
                out += [Message(content=text, **common) for text in texts]
            if calls:
                out.append(Message(tool_calls=tuple(calls), **common))
        else:
            raise BadRequest(f"invalid message content type: {_go_kind(content)}")
        if len(out) > MAX_MESSAGES:  # content parts count: each becomes a message
            raise BadRequest(f"too many messages: more than {MAX_MESSAGES} with their content parts")
    return out


@dataclass(frozen=True)
class ChatCompletionRequest:
    native: ChatRequest
    stream: StreamSettings

    @classmethod
    def from_body(cls, raw: bytes) -> "ChatCompletionRequest":
        d = decode_body(raw, _CHAT_SPEC)
        max_tokens = d.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = d.get("max_tokens")
        top_logprobs = checked_top_logprobs(d.get("top_logprobs"))
        native = ChatRequest(
            model=d.get("model") or "",
            messages=tuple(_messages(d.get("messages") or [])),
            tools=tuple(d.get("tools") or ()),
            tool_choice=d.get("tool_choice"),
            format=_format(d.get("response_format")),
            options=_sampling_options(d, max_tokens),
            stream=bool(d.get("stream")),
            keep_alive_ns=parse_keep_alive(d.get("keep_alive")),
            think=_think(d),
            logprobs=bool(d.get("logprobs")),
            top_logprobs=top_logprobs,
        )
        return cls(native, StreamSettings.from_dict(d))


@dataclass(frozen=True)
class CompletionRequest:
    native: GenerateRequest
    stream: StreamSettings

    @classmethod
    def from_body(cls, raw: bytes) -> "CompletionRequest":
        d = decode_body(raw, _COMPLETION_SPEC)
        top_logprobs = checked_top_logprobs(d.get("logprobs"), "logprobs")
        options = _sampling_options(d, d.get("max_tokens"))
        options.setdefault("frequency_penalty", 0.0)
        options.setdefault("presence_penalty", 0.0)
        native = GenerateRequest(
            model=d.get("model") or "",
            prompt=d.get("prompt") or "",
            suffix=d.get("suffix") or "",
            options=options,
            stream=bool(d.get("stream")),
            keep_alive_ns=parse_keep_alive(d.get("keep_alive")),
            logprobs=d.get("logprobs") is not None,
            top_logprobs=top_logprobs,
            raw=False,
        )
        return cls(native, StreamSettings.from_dict(d))


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    dimensions: int = 0
    base64: bool = False
    keep_alive_ns: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, raw: bytes) -> "EmbeddingRequest":
        d = decode_body(raw, _EMBEDDING_SPEC)
        value = d.get("input")
        if isinstance(value, str):
            inputs: tuple[str, ...] = (value,)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            inputs = tuple(value)
        else:  # missing, [], or token arrays (not supported, as in Ollama)
            raise BadRequest("invalid input")
        encoding = (d.get("encoding_format") or "float").lower()
        if encoding not in ("float", "base64"):
            raise BadRequest(f"Invalid value for 'encoding_format' = {d.get('encoding_format')}. "
                             f"Supported values: ['float', 'base64'].")
        return cls(model=d.get("model") or "", inputs=inputs, dimensions=d.get("dimensions") or 0,
                   base64=encoding == "base64", keep_alive_ns=parse_keep_alive(d.get("keep_alive")),
                   options=d.get("options") or {})


# ---------------------------------------------------------------------------------------
# Replies: native lines -> OpenAI objects.

_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}


def finish_reason(done_reason: str | None, tool_calls: bool = False) -> str | None:
    if done_reason is None:
        return None
    if tool_calls:
        return "tool_calls"
    return _FINISH.get(done_reason, done_reason)


def usage(final: Mapping[str, Any]) -> dict[str, int]:
    prompt, completion = final.get("prompt_eval_count") or 0, final.get("eval_count") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _openai_tool_calls(calls: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Native calls (object arguments) in OpenAI's form (a JSON string)."""
    return [{"id": c.get("id") or f"call_{random.getrandbits(40):010x}", "index": i, "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"].get("arguments") or {}, ensure_ascii=False)}}
            for i, c in enumerate(calls)]


def _legacy_logprobs(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """/v1/completions' logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", ())} for e in entries],
            "text_offset": offsets}


@dataclass
class ReplyIds:
    """What every object of one reply shares."""

    model: str
    prefix: str  # "chatcmpl" or "cmpl"
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.prefix}-{random.randrange(999)}"
        self.created = self.created or int(time.time())

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}


def chat_completion(ids: ReplyIds, lines: list[Mapping[str, Any]]) -> dict[str, Any]:
    """stream:false: all native chat lines folded into one chat.completion."""
    final = lines[-1]
    content = "".join(ln.get("message", {}).get("content", "") for ln in lines)
    reasoning = "".join(ln.get("message", {}).get("thinking", "") for ln in lines)
    calls = [c for ln in lines for c in ln.get("message", {}).get("tool_calls", ())]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = _openai_tool_calls(calls)
    choice: dict[str, Any] = {"index": 0, "message": message,
                              "finish_reason": finish_reason(final.get("done_reason"), bool(calls))}
    logprobs = [lp for ln in lines for lp in ln.get("logprobs", ())]
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    return {**ids.envelope("chat.completion"), "choices": [choice], "usage": usage(final)}


class ChatChunks:
    """stream:true: native chat lines -> chat.completion.chunk events, in OpenAI's order:
    a role chunk first, content (or reasoning, or whole tool calls), a finish chunk with an
    empty delta, the usage chunk when asked for."""

    def __init__(self, ids: ReplyIds, include_usage: bool) -> None:
        self.ids, self.include_usage = ids, include_usage
        self.started = self.saw_tool_calls = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = {"content": logprobs}
        return {**self.ids.envelope("chat.completion.chunk"), "choices": [choice]}

    def convert(self, line: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        message = line.get("message") or {}
        parts: list[dict[str, Any]] = []
        if message.get("thinking"):
            parts.append({"reasoning": message["thinking"]})
        if message.get("content"):
            parts.append({"content": message["content"]})
        if message.get("tool_calls"):
            self.saw_tool_calls = True
            parts.append({"tool_calls": _openai_tool_calls(message["tool_calls"])})
        if not self.started:
            self.started = True
            first = parts.pop(0) if parts else {"content": ""}
            first.setdefault("content", "")
            yield self._chunk({"role": "assistant", **first}, logprobs=line.get("logprobs"))
        elif parts:
            yield self._chunk(parts.pop(0), logprobs=line.get("logprobs"))
        for delta in parts:
            yield self._chunk(delta)
        if line.get("done"):
            yield self._chunk({}, finish_reason(line.get("done_reason"), self.saw_tool_calls))
            if self.include_usage:
                yield {**self.ids.envelope("chat.completion.chunk"), "choices": [], "usage": usage(line)}


def text_completion(ids: ReplyIds, lines: list[Mapping[str, Any]]) -> dict[str, Any]:
    final = lines[-1]
    choice: dict[str, Any] = {"text": "".join(ln.get("response", "") for ln in lines), "index": 0,
                              "finish_reason": finish_reason(final.get("done_reason"))}
    logprobs = [lp for ln in lines for lp in ln.get("logprobs", ())]
    if logprobs:
        choice["logprobs"] = _legacy_logprobs(logprobs)
    return {**ids.envelope("text_completion"), "choices": [choice], "usage": usage(final)}


class CompletionChunks:
    """stream:true for /v1/completions: one chunk per native line; finish_reason is null until
    the last; with include_usage each chunk carries zeroed usage and a usage chunk follows."""

    def __init__(self, ids: ReplyIds, include_usage: bool) -> None:
        self.ids, self.include_usage = ids, include_usage

    def convert(self, line: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        choice: dict[str, Any] = {"text": line.get("response", ""), "index": 0,
                                  "finish_reason": finish_reason(line.get("done_reason"))}
        if line.get("logprobs"):
            choice["logprobs"] = _legacy_logprobs(line["logprobs"])
        chunk = {**self.ids.envelope("text_completion"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        yield chunk
        if line.get("done") and self.include_usage:
            yield {**self.ids.envelope("text_completion"), "choices": [], "usage": usage(line)}


def embedding_list(model: str, vectors: list[list[float]], tokens: int, as_base64: bool) -> dict[str, Any]:
    def encode(vector: list[float]) -> Any:
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return {"object": "list",
            "data": [{"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(vectors)],
            "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_object(name: str, namespace: str, modified_at: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(modified_at), "owned_by": namespace}
