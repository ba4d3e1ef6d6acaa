"""Constrained decoding: JSON mode, JSON Schema and tool-call grammars, through llguidance.

llguidance was measured against xgrammar on SmolLM2's 49,152-word tokenizer (a nested
schema with $ref, enum and arrays): compile 2.6 ms vs 11 ms, tokenizer setup 0.6 s vs
0.3 s, mask 130 us vs 16 us per token. Both masks are small next to a decode step (the
benchmark in bench/structured.py measures the whole cost, and the mask is computed while the
GPU runs the step). llguidance was chosen for having no dependencies (one abi3 wheel for
every Python; xgrammar pulls triton and tvm-ffi) and for its Lark grammars, which express a
tool call in the model's own syntax and free thinking before a constrained answer.

JSON is compact (no free whitespace), so a model cannot run on emitting whitespace, and a
matcher stops as soon as the top-level value closes: the runner ends the generation there.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from daemon.errors import BadRequest

# JSON mode: an object, as Ollama's `format: "json"` grammar (llama.cpp's json.gbnf root).
JSON_OBJECT: dict[str, Any] = {"type": "object"}
# No free whitespace: a model cannot run on emitting it (Ollama issue #2577). Keywords
# llguidance does not implement (uniqueItems, some formats) are ignored rather than refused,
# as clients send pydantic's schemas with whatever they hold.
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": True}
SPACED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    import llguidance  # imported on first use: only constrained requests need it

    return llguidance


def closed(schema: Any) -> Any:
    """Objects that list their properties get only those unless they say otherwise, as in
    llama.cpp's schema grammars (which Ollama uses) and OpenAI's strict mode: pydantic's
    schemas leave additionalProperties out, and an open object lets a small model wander
    into extra keys without end."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in ("const", "enum", "default", "examples"):
            out[key] = value
        else:
            out[key] = closed(value)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_format(value: Any) -> None:
    """`format` is "json" (or off) or a JSON Schema object; anything else is a 400."""
    if not (value is None or value == "json" or isinstance(value, dict)):
        raise BadRequest(f'invalid format: {json.dumps(value)}; expected "json" or a valid JSON Schema object')


def json_answer(schema: Any) -> list[str]:
    """Lark rules whose `answer` is a JSON value: `format` ("json" / None, or a schema)."""
    check_format(schema)
    if schema is None or schema == "json":
        schema = JSON_OBJECT
    return ["answer: %json " + json.dumps({**closed(schema), "x-guidance": COMPACT})]


def _quoted(text: str) -> str:
    return json.dumps(text)


def tool_call_answer(dialect: str, tools: Sequence[dict[str, Any]], only: str | None = None,
                     literal: Callable[[str], str] = _quoted) -> list[str]:
    """Lark rules whose `answer` is exactly one call of one of the tools, in the model's own
    syntax: tool_choice "required" (or a named function)."""
    key = "parameters" if dialect == "llama3" else "arguments"
    options = []
    for tool in tools:
        function = tool.get("function") or {}
        name = function.get("name")
        if not name or (only and name != only):
            continue
        parameters = closed(function.get("parameters") or {"type": "object"})
        options.append({"type": "object", "properties": {"name": {"const": name}, key: parameters},
                        "required": ["name", key], "additionalProperties": False})
    if not options:
        raise BadRequest(f"tool_choice names a function that is not in tools: {only}" if only
                         else "tool_choice requires tools")
    if dialect == "harmony":  # the recipient in the header, the arguments as the message
        marks = f'" " {literal("<|constrain|>")} "json" {literal("<|message|>")}'
        names = [o["properties"]["name"]["const"] for o in options]
        return ([f"answer: {' | '.join(f'call{i}' for i in range(len(options)))}"]
                + [f"call{i}: {_quoted(name)} {marks} args{i}" for i, name in enumerate(names)]
                + [f"args{i}: %json " + json.dumps({**o["properties"][key], "x-guidance": SPACED})
                   for i, o in enumerate(options)])
    schema = {"anyOf": options} if len(options) > 1 else options[0]
    call = "call: %json " + json.dumps({**schema, "x-guidance": SPACED})
    if dialect == "hermes":
        return [f'answer: {literal("<tool_call>")} "\\n" call "\\n" {literal("</tool_call>")}', call]
    if dialect == "mistral":
        return [f'answer: {literal("[TOOL_CALLS]")} "[" call "]"', call]
    return ["answer: call", call]


def entry(answer: list[str], thinking: str | None, literal: Callable[[str], str] = _quoted,
          start: str = "<think>", end: str = "</think>") -> str:
    """The whole grammar: free thinking first where the model thinks (`inside`: the prompt
    opened the block; `optional`: the model may open one), then the constrained answer.
    Ollama lets a thinking model think unconstrained and constrains the answer; so do we."""
    head = {
        None: ["start: answer"],
        "inside": ["start: thinking WS? answer"],
        "optional": [f"start: (WS? {literal(start)} thinking WS?)? answer"],
    }[thinking]
    rules = head + answer
    if thinking:
        rules += _thinking(literal(end))
        rules.append("WS: /[ \\t\\r\\n]+/")
    return "\n".join(rules) + "\n"


def _thinking(marker: str) -> list[str]:
    """The `thinking` rule: free text up to its end marker, which it includes."""
    if marker.startswith("<["):  # the tokenizer's own token: no text can match it, so free text runs up to it
        return [f"thinking: THOUGHT {marker}", "THOUGHT: /(.|\\n)*/"]
    return [f"thinking[stop={marker}]: /(.|\\n)*/"]  # text: the lexeme stops at the first end marker


def harmony_entry(answer: list[str], tool_call: bool, literal: Callable[[str], str] = _quoted) -> str:
    """The whole grammar for gpt-oss (harmony): its analysis message free, as it always writes
    one, then the answer as its own message: the final channel's text (`format`), or a tool
    call's commentary to functions.NAME (tool_call_answer's harmony form). The prompt ends with
    `<|start|>assistant`; the EOS tokens (<|return|>, <|call|>) end the answer."""
    channel, message = literal("<|channel|>"), literal("<|message|>")
    reply = f'{channel} "commentary to=functions." answer' if tool_call else f'{channel} "final" {message} answer'
    rules = [f'start: ({channel} "analysis" {message} thinking {literal("<|start|>")} "assistant")? reply',
             f"reply: {reply}", *answer, *_thinking(literal("<|end|>"))]
    return "\n".join(rules) + "\n"


class GrammarCompiler:
    """Grammars for one tokenizer: the llguidance tokenizer is built once (about a second
    for a large vocabulary); validated grammars are remembered."""

    def __init__(self, tokenizer: Any, eos_token_ids: Sequence[int], cache_size: int = 128) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._tokenizer = None
        self._lock = threading.Lock()
        self._valid: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cache_size = cache_size

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos or None)
            return self._tokenizer

    def literal(self, text: str) -> str:
        """A marker in a grammar: the tokenizer's own token where it has one that llguidance
        treats as special (<think>, <tool_call>, [TOOL_CALLS] in many vocabularies; such a
        token never matches quoted text), else the quoted text."""
        ids = self._hf_tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return _quoted(text)

    def compile(self, lark: str) -> "Grammar":
        """A grammar from Lark text (see `entry`); an invalid one (a bad schema) is a 400."""
        with self._lock:
            known = lark in self._valid
            if known:
                self._valid.move_to_end(lark)
        if not known:
            error = _llguidance().LLMatcher.validate_grammar(lark, self.tokenizer)
            if error and not error.startswith("WARNING"):
                raise BadRequest(f"invalid format: {_first_line(error)}")
            with self._lock:
                self._valid[lark] = None
                while len(self._valid) > self._cache_size:
                    self._valid.popitem(last=False)
        return Grammar(lark, self)


def _first_line(error: str) -> str:
    line = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    marker = "failed to compile JSON schema: "
    return "invalid JSON schema: " + line.split(marker, 1)[1] if marker in line else line


@dataclass(frozen=True)
class Grammar:
    text: str
    compiler: GrammarCompiler

    def matcher(self) -> "Constraint":
        """A fresh per-request matcher."""
        tokenizer = self.compiler.tokenizer
        matcher = _llguidance().LLMatcher(tokenizer, self.text, log_level=0)
        if matcher.is_error():
            raise BadRequest(f"invalid format: {_first_line(matcher.get_error())}")
        return Constraint(matcher, tokenizer.vocab_size)


class Constraint:
    """One sequence's grammar state: which tokens may come next, and whether the value is
    complete."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    @property
    def finished(self) -> bool:
        """The top-level value closed: nothing but EOS may follow."""
        return self._matcher.is_stopped()

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)


class Masker:
    """Builds and applies the allowed-token masks of one decode step (one per runner: it owns
    llguidance's thread pool, used when several rows are constrained at once)."""

    def __init__(self) -> None:
        self._executor = None
        self._bits: dict[torch.device, torch.Tensor] = {}

    def fill(self, constraints: Sequence[Constraint | None]) -> tuple[list[int], torch.Tensor] | None:
        """The constrained rows and their bitmasks (int32 words; bit i of word j allows token
        32*j+i of the tokenizer's vocabulary). None when no row is constrained."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        words = (constraints[rows[0]].vocab_size + 31) // 32
        masks = torch.zeros((len(rows), words), dtype=torch.int32)
        if len(rows) == 1:
            constraints[rows[0]]._matcher.unsafe_compute_mask_ptr(masks.data_ptr(), words * 4)
        else:
            if self._executor is None:
                self._executor = _llguidance().LLExecutor()
            pairs = [(constraints[row]._matcher, k) for k, row in enumerate(rows)]
            self._executor.unsafe_compute_mask_ptr(pairs, masks.data_ptr(), words * 4, len(rows))
        return rows, masks

    def apply(self, logits: torch.Tensor, filled: tuple[list[int], torch.Tensor]) -> None:
        """Disallowed tokens of the constrained rows get -inf, in place (and so do ids past the
        tokenizer's vocabulary, where the model's output is wider)."""
        rows, masks = filled
        width = logits.shape[-1]
        if logits.device.type == "cpu":  # numpy unpacks bits several times faster than torch there
            import numpy

            bits = numpy.unpackbits(masks.numpy().view(numpy.uint8), axis=1, bitorder="little")
            allowed = torch.from_numpy(bits).bool()
        else:
            shifts = self._bits.get(logits.device)
            if shifts is None:
                shifts = self._bits[logits.device] = 1 << torch.arange(32, dtype=torch.int32, device=logits.device)
            masks = masks.to(logits.device, non_blocking=True)
            allowed = ((masks.unsqueeze(-1) & shifts) != 0).reshape(len(rows), -1)
        if allowed.shape[1] < width:
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(~allowed[:, :width], float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(~allowed[:, :width], float("-inf"))
