"""Typed requests of the native API (Go: api/types.go), decoded from raw bodies.

Each request type owns its decoding; handlers receive typed values and never look at raw
JSON. Semantics follow Ollama: `stream` defaults to true, roles are lower-cased, a missing
message content is "", the legacy `name` key stands in for `model`.
"""

from __future__ import annotations

import binascii
import base64
from dataclasses import dataclass, field
from typing import Any, Mapping

from daemon.api.decode import ArrayOf, Struct, decode_body
from daemon.durations import parse_keep_alive
from daemon.errors import BadRequest

THINK_LEVELS = ("high", "medium", "low", "max")

_TOOL_CALL = Struct("ToolCall", {
    "id": "string",
    "type": "string",
    "function": Struct("ToolCallFunction", {
        "index": "int",
        "name": "string",
        "arguments": "map[string]interface {}",
    }),
})
_MESSAGE = Struct("Message", {
    "role": "string",
    "content": "string",
    "thinking": "string",
    "images": "[]string",
    "tool_calls": ArrayOf(_TOOL_CALL),
    "tool_name": "string",
    "tool_call_id": "string",
})
_COMMON_INFERENCE = {
    "model": "string",
    "format": "interface {}",
    "options": "map[string]interface {}",
    "stream": "bool",
    "keep_alive": "interface {}",
    "think": "interface {}",
    "truncate": "bool",
    "shift": "bool",  # type-checked as Go does; there is no context shift to turn off
    "logprobs": "bool",
    "top_logprobs": "int",
    "_debug_render_only": "bool",
}
GENERATE_SPEC = Struct("GenerateRequest", {
    **_COMMON_INFERENCE,
    "prompt": "string",
    "suffix": "string",
    "system": "string",
    "template": "string",
    "context": "[]int",
    "raw": "bool",
    "images": "[]string",
})
# A conversation no context holds (every message takes tokens): refused before the work of
# checking each message, so a request of a million messages answers at once.
MAX_MESSAGES = 65536

CHAT_SPEC = Struct("ChatRequest", {
    **_COMMON_INFERENCE,
    "messages": ArrayOf(_MESSAGE, MAX_MESSAGES, "messages"),
    "tools": ArrayOf("map[string]interface {}"),
    "tool_choice": "interface {}",
})
SHOW_SPEC = Struct("ShowRequest", {
    "model": "string",
    "name": "string",
    "verbose": "bool",
    "system": "string",
    "template": "string",
    "options": "map[string]interface {}",
})


@dataclass(frozen=True)
class Think:
    """`think`: true/false or a level; a bare true is level "medium"."""

    enabled: bool
    level: str | None = None

    @classmethod
    def parse(cls, value: Any) -> "Think | None":
        if value is None:
            return None
        if isinstance(value, bool):
            return cls(enabled=value, level="medium" if value else None)
        if isinstance(value, str) and value in THINK_LEVELS:
            return cls(enabled=True, level=value)
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower()
        raise BadRequest(f'invalid think value: {shown} (must be "high", "medium", "low", "max", true, or false)')


def check_base64_image(data: str) -> None:
    """Ollama decodes images as plain base64 ([]byte), so a data: URI fails with Go's text."""
    raw = data.encode()
    try:  # the common case at C speed (a 3 MB image: milliseconds, not a Python loop's 200)
        base64.b64decode(raw.translate(None, b"\r\n"), validate=True)
        return
    except (binascii.Error, ValueError):
        pass
    alphabet = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    for i, c in enumerate(raw):
        if c not in alphabet and c not in b"=\r\n":
            raise BadRequest(f"illegal base64 data at input byte {i}")
    try:
        base64.b64decode(raw, validate=False)
    except binascii.Error:
        raise BadRequest(f"illegal base64 data at input byte {len(raw.rstrip(b'='))}") from None


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    thinking: str = ""
    images: tuple[str, ...] = ()
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    tool_name: str = ""
    tool_call_id: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Message":
        images = tuple(d.get("images") or ())
        for image in images:
            check_base64_image(image)
        return cls(
            role=(d.get("role") or "").lower(),
            content=d.get("content") or "",
            thinking=d.get("thinking") or "",
            images=images,
            tool_calls=tuple(d.get("tool_calls") or ()),
            tool_name=d.get("tool_name") or "",
            tool_call_id=d.get("tool_call_id") or "",
        )

    def to_template_dict(self) -> dict[str, Any]:
        """The message as HF chat templates expect it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            out["thinking"] = out["reasoning_content"] = self.thinking
        if self.tool_calls:
            out["tool_calls"] = [dict(tc) for tc in self.tool_calls]
        if self.tool_name:
            out["name"] = out["tool_name"] = self.tool_name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class InferenceCommon:
    """Fields generate and chat share."""

    model: str
    format: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True
    keep_alive_ns: int | None = None
    think: Think | None = None
    truncate: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    debug_render_only: bool = False


def checked_top_logprobs(value: int | None, field: str = "top_logprobs") -> int:
    value = value or 0
    if not 0 <= value <= 20:
        raise BadRequest(f"{field} must be between 0 and 20")
    return value


def _common(d: Mapping[str, Any]) -> dict[str, Any]:
    top_logprobs = checked_top_logprobs(d.get("top_logprobs"))
    return dict(
        model=d.get("model") or "",
        format=d.get("format"),
        options=d.get("options") or {},
        stream=d.get("stream") is not False,
        keep_alive_ns=parse_keep_alive(d.get("keep_alive")),
        think=Think.parse(d.get("think")),
        truncate=d.get("truncate") is not False,
        logprobs=bool(d.get("logprobs")),
        top_logprobs=top_logprobs,
        debug_render_only=bool(d.get("_debug_render_only")),
    )


@dataclass(frozen=True)
class GenerateRequest(InferenceCommon):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    context: tuple[int, ...] | None = None
    raw: bool = False
    images: tuple[str, ...] = ()

    @classmethod
    def from_body(cls, raw: bytes) -> "GenerateRequest":
        d = decode_body(raw, GENERATE_SPEC)
        images = tuple(d.get("images") or ())
        for image in images:
            check_base64_image(image)
        context = d.get("context")
        return cls(
            **_common(d),
            prompt=d.get("prompt") or "",
            suffix=d.get("suffix") or "",
            system=d.get("system") or "",
            template=d.get("template") or "",
            context=tuple(context) if context is not None else None,
            raw=bool(d.get("raw")),
            images=images,
        )


@dataclass(frozen=True)
class ChatRequest(InferenceCommon):
    messages: tuple[Message, ...] = ()
    tools: tuple[Mapping[str, Any], ...] = ()
    # hfollama: OpenAI's tool_choice ("auto" | "none" | "required" | {"type": "function",
    # "function": {"name": ...}}), also accepted on /api/chat
    tool_choice: Any = None

    def __post_init__(self) -> None:
        if self.tool_choice == "none":  # no tools at all, whichever API asked (Ollama ignores it)
            object.__setattr__(self, "tools", ())

    @classmethod
    def from_body(cls, raw: bytes) -> "ChatRequest":
        d = decode_body(raw, CHAT_SPEC)
        return cls(
            **_common(d),
            messages=tuple(Message.from_dict(m) for m in d.get("messages") or () if m is not None),
            tools=tuple(d.get("tools") or ()),
            tool_choice=d.get("tool_choice"),
        )


@dataclass(frozen=True)
class ShowRequest:
    model: str
    verbose: bool = False
    system: str = ""
    template: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, raw: bytes) -> "ShowRequest":
        d = decode_body(raw, SHOW_SPEC)
        model = d.get("model") or d.get("name") or ""
        if not model.strip():
            raise BadRequest("model is required")
        return cls(
            model=model,
            verbose=bool(d.get("verbose")),
            system=d.get("system") or "",
            template=d.get("template") or "",
            options=d.get("options") or {},
        )


PULL_SPEC = Struct("PullRequest", {"model": "string", "name": "string", "insecure": "bool", "stream": "bool",
                                   "username": "string", "password": "string"})
COPY_SPEC = Struct("CopyRequest", {"source": "string", "destination": "string"})
DELETE_SPEC = Struct("DeleteRequest", {"model": "string", "name": "string"})
CREATE_SPEC = Struct("CreateRequest", {
    "model": "string", "name": "string", "from": "string", "files": "map[string]interface {}",
    "adapters": "map[string]interface {}", "template": "string", "system": "string", "license": "interface {}",
    "parameters": "map[string]interface {}", "messages": ArrayOf(_MESSAGE), "quantize": "string",
    "quantization": "interface {}", "stream": "bool", "source": "map[string]interface {}",
    "renderer": "string", "parser": "string", "requires": "string",
})


@dataclass(frozen=True)
class PullRequest:
    model: str
    stream: bool = True
    insecure: bool = False

    @classmethod
    def from_body(cls, raw: bytes) -> "PullRequest":
        d = decode_body(raw, PULL_SPEC)
        return cls(model=d.get("model") or d.get("name") or "", stream=d.get("stream") is not False,
                   insecure=bool(d.get("insecure")))


@dataclass(frozen=True)
class CopyRequest:
    source: str
    destination: str

    @classmethod
    def from_body(cls, raw: bytes) -> "CopyRequest":
        d = decode_body(raw, COPY_SPEC)
        return cls(source=d.get("source") or "", destination=d.get("destination") or "")


@dataclass(frozen=True)
class DeleteRequest:
    model: str

    @classmethod
    def from_body(cls, raw: bytes) -> "DeleteRequest":
        d = decode_body(raw, DELETE_SPEC)
        return cls(model=d.get("model") or d.get("name") or "")


@dataclass(frozen=True)
class CreateRequest:
    model: str
    base: str = ""  # `from`
    files: Mapping[str, str] = field(default_factory=dict)
    adapters: Mapping[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    license: str | None = None
    parameters: Mapping[str, Any] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    quantize: str = ""
    quantization: Mapping[str, Any] | None = None  # hfollama: {mode, double_quant, compute_dtype}
    source: Mapping[str, Any] | None = None  # hfollama: a Hub repo to pull, as in a YAML modelfile
    stream: bool = True

    @classmethod
    def from_body(cls, raw: bytes) -> "CreateRequest":
        d = decode_body(raw, CREATE_SPEC)
        files = d.get("files") or {}
        for key, value in files.items():
            if not isinstance(value, str):
                raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into Go struct field "
                                 f"CreateRequest.files of type string")
        license_ = d.get("license")
        if isinstance(license_, list):
            license_ = "\n".join(str(x) for x in license_)
        elif license_ is not None and not isinstance(license_, str):
            raise BadRequest("json: cannot unmarshal license into Go struct field CreateRequest.license")
        quantization = d.get("quantization")
        quantize = d.get("quantize") or (quantization if isinstance(quantization, str) else "") or ""
        messages = d.get("messages")
        return cls(
            model=d.get("model") or d.get("name") or "",
            base=d.get("from") or "",
            files=files,
            adapters=d.get("adapters") or {},
            template=d.get("template"),
            system=d.get("system"),
            license=license_,
            parameters=d.get("parameters"),
            messages=None if messages is None else tuple(
                {"role": (m.get("role") or "").lower(), "content": m.get("content") or ""} for m in messages if m),
            quantize=quantize,
            quantization=quantization if isinstance(quantization, dict) else None,
            source=d.get("source"),
            stream=d.get("stream") is not False,
        )


EMBED_SPEC = Struct("EmbedRequest", {"model": "string", "input": "interface {}", "truncate": "bool",
                                     "dimensions": "int", "options": "map[string]interface {}",
                                     "keep_alive": "interface {}"})
EMBEDDINGS_SPEC = Struct("EmbeddingRequest", {"model": "string", "prompt": "string",
                                              "options": "map[string]interface {}", "keep_alive": "interface {}"})


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    inputs: tuple[str, ...] = ()
    truncate: bool = True
    dimensions: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive_ns: int | None = None

    @classmethod
    def from_body(cls, raw: bytes) -> "EmbedRequest":
        d = decode_body(raw, EMBED_SPEC)
        value = d.get("input")
        if isinstance(value, str):
            inputs: tuple[str, ...] = (value,) if value else ()
        elif isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise BadRequest("invalid input type")
            inputs = tuple(value)
        elif value is None:
            inputs = ()
        else:
            raise BadRequest("invalid input type")
        return cls(model=d.get("model") or "", inputs=inputs, truncate=d.get("truncate") is not False,
                   dimensions=d.get("dimensions") or 0, options=d.get("options") or {},
                   keep_alive_ns=parse_keep_alive(d.get("keep_alive")))


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    prompt: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive_ns: int | None = None

    @classmethod
    def from_body(cls, raw: bytes) -> "EmbeddingsRequest":
        d = decode_body(raw, EMBEDDINGS_SPEC)
        return cls(model=d.get("model") or "", prompt=d.get("prompt") or "", options=d.get("options") or {},
                   keep_alive_ns=parse_keep_alive(d.get("keep_alive")))
