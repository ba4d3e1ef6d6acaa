"""Reading a model's output as it streams: thinking split from the answer, tool calls parsed
out of it. Both work on text pieces and hold back only what could still be a marker, so the
answer streams as it comes and each tool call goes out whole as soon as it is complete.

Tool-call dialects (chosen from the chat template, or the modelfile's `tool_parser`):
- hermes:  <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes, Qwen, SmolLM3)
- mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
- llama3:  {"name": ..., "parameters": {...}} as the whole answer, optionally after
           <|python_tag|>, several separated by ";" (Llama 3.1+)
- harmony: gpt-oss's channels, which carry its thinking too (HarmonyReader)
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

# What opens a call in each dialect (llama3 also takes a bare "{" at the start of the answer)
_CALL_STARTS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>",)}
DIALECTS = (*_CALL_STARTS, "harmony")
HARMONY_CHANNEL = "<|channel|>"
_ALNUM = string.ascii_lowercase + string.digits


def call_id() -> str:
    """Ollama's form: call_ + 8 lowercase alphanumerics."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(8))


def dialect_for(template: str, configured: str | None = None) -> str:
    if configured:
        return configured
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if HARMONY_CHANNEL in template:
        return "harmony"
    return "llama3"


@dataclass
class Part:
    """What one piece of output adds to the reply."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.thinking or self.tool_calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that starts `marker` (to hold back)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ThinkingSplitter:
    """Splits `<think>...</think>` from the answer. `inside` says whether the prompt already
    opened the block (templates that end the generation prompt with <think>); `keep=False`
    drops the thinking (think:false on a model that thinks anyway)."""

    def __init__(self, inside: bool = False, keep: bool = True, start: str = "<think>",
                 end: str = "</think>") -> None:
        self.start, self.end, self.keep = start, end, keep
        self._state = "thinking_start" if inside else "opening"
        self._buffer = ""

    def push(self, text: str) -> tuple[str, str]:
        """Returns (thinking, content) that are safe to emit."""
        self._buffer += text
        thinking = content = ""
        while self._buffer:
            if self._state == "opening":  # whitespace, then maybe the start tag
                stripped = self._buffer.lstrip()
                if stripped.startswith(self.start):
                    self._buffer, self._state = stripped[len(self.start):], "thinking_start"
                elif not stripped or self.start.startswith(stripped):
                    break
                else:
                    self._state = "answer"
            elif self._state == "thinking_start":  # the thinking's leading whitespace goes
                self._buffer = self._buffer.lstrip()
                if self._buffer:
                    self._state = "thinking"
            elif self._state == "thinking":
                i = self._buffer.find(self.end)
                if i >= 0:
                    thinking += self._buffer[:i]
                    self._buffer, self._state = self._buffer[i + len(self.end):], "after"
                    continue
                hold = _partial_suffix(self._buffer, self.end)
                cut = len(self._buffer) - hold
                thinking, self._buffer = thinking + self._buffer[:cut], self._buffer[cut:]
                break
            elif self._state == "after":  # the answer's leading whitespace goes
                self._buffer = self._buffer.lstrip()
                if self._buffer:
                    self._state = "answer"
            else:
                content, self._buffer = content + self._buffer, ""
        return (thinking if self.keep else ""), content

    def flush(self) -> tuple[str, str]:
        rest, self._buffer = self._buffer, ""
        if self._state in ("thinking", "thinking_start"):
            return (rest.lstrip() if self.keep else ""), ""
        return "", rest.lstrip() if self._state in ("opening", "after") else rest


class ToolCallParser:
    """Finds tool calls in the answer text; everything else is content."""

    def __init__(self, dialect: str, tool_names: Iterable[str] = ()) -> None:
        if dialect not in _CALL_STARTS:  # harmony's calls are HarmonyReader's
            raise ValueError(f"unknown tool-call dialect {dialect!r}")
        self.dialect = dialect
        self.names = set(tool_names)
        self._buffer = ""
        self._calling = False  # inside a call's syntax: buffering until it completes
        self._seen_text = False
        self._index = 0

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        content, calls = "", []
        while self._buffer:
            if not self._calling:
                out, found = self._scan_for_start()
                content += out
                if not found:
                    break
                self._calling = True
            parsed = self._parse_call()
            if parsed is None:
                break
            found, not_a_call = parsed
            calls.extend(found)
            content += not_a_call
            self._calling = False
        if content.strip():
            self._seen_text = True
        return content, calls

    def _scan_for_start(self) -> tuple[str, bool]:
        """Text before a call's start marker; consumes the marker. Holds back a possible
        partial marker (and, for llama3, a leading "{" that may begin a call)."""
        buf = self._buffer
        best = -1
        marker = ""
        for start in _CALL_STARTS[self.dialect]:
            i = buf.find(start)
            if i >= 0 and (best < 0 or i < best):
                best, marker = i, start
        if self.dialect == "llama3" and not self._seen_text:
            lead = buf.lstrip()
            if self._index and lead.startswith(";"):  # the separator between two calls
                lead = lead[1:].lstrip()
            if lead.startswith("{") and (best < 0 or len(buf) - len(lead) < best):
                self._buffer = lead
                return "", True
        if best >= 0:
            self._buffer = buf[best + len(marker):]
            return buf[:best], True
        hold = max(_partial_suffix(buf, s) for s in _CALL_STARTS[self.dialect])
        if self.dialect == "llama3" and not self._seen_text and not buf.strip().strip(";"):
            hold = len(buf)  # only whitespace (or a separator) so far: a call may still start
        cut = len(buf) - hold
        self._buffer = buf[cut:]
        return buf[:cut], False

    def _parse_call(self) -> tuple[list[dict[str, Any]], str] | None:
        """Complete calls at the start of the buffer (consumed), or JSON that turned out not
        to be a call (as text); None while incomplete."""
        buf = self._buffer.lstrip()
        if not buf:
            return None
        try:
            value, end = json.JSONDecoder().raw_decode(buf)
        except json.JSONDecodeError:
            return None  # not complete yet (flush() reports what never completed)
        rest = buf[end:]
        if self.dialect == "hermes":
            stripped = rest.lstrip()
            if not stripped:
                return None  # wait for the end tag
            if stripped.startswith("</tool_call>"):
                rest = stripped[len("</tool_call>"):]
            elif "</tool_call>".startswith(stripped):
                return None
        elif self.dialect == "llama3":
            stripped = rest.lstrip()
            if stripped.startswith(";"):
                rest = stripped[1:]
        calls = self._calls(value)
        if calls is None:  # JSON, but not a call: it was content after all
            self._buffer, self._seen_text = "", True
            return [], buf[:end] + rest
        self._buffer = rest
        return calls, ""

    def _calls(self, value: Any) -> list[dict[str, Any]] | None:
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            if self.dialect == "llama3" and self.names and item["name"] not in self.names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append({"id": call_id(), "function": {"index": self._index, "name": item["name"],
                                                        "arguments": arguments}})
            self._index += 1
        return calls

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: text that never became a call is content."""
        rest, self._buffer = self._buffer, ""
        if self._calling:
            self._calling = False
            complete = self._complete_call(rest)
            if complete is not None:  # cut off after its JSON (num_predict): a call, as in Ollama
                return "", complete
            bare = self.dialect == "llama3" and rest.lstrip().startswith("{")  # no marker was consumed
            marker = "" if bare else _CALL_STARTS[self.dialect][0]
            return marker + rest, []
        return rest, []


    def _complete_call(self, text: str) -> list[dict[str, Any]] | None:
        """The calls of a buffer whose JSON is whole and followed by nothing but (part of)
        the end tag."""
        buf = text.lstrip()
        try:
            value, end = json.JSONDecoder().raw_decode(buf)
        except json.JSONDecodeError:
            return None
        tail = buf[end:].strip()
        if tail and not (self.dialect == "hermes" and "</tool_call>".startswith(tail)):
            return None
        return self._calls(value)


class OutputReader:
    """The whole path from generated text to reply parts: thinking first, then tool calls
    (when the request has tools)."""

    def __init__(self, thinking: ThinkingSplitter | None, tools: ToolCallParser | None) -> None:
        self.thinking, self.tools = thinking, tools

    def push(self, text: str) -> Part:
        thinking, content = self.thinking.push(text) if self.thinking else ("", text)
        return self._answer(Part(thinking=thinking), content, final=False)

    def flush(self) -> Part:
        thinking, content = self.thinking.flush() if self.thinking else ("", "")
        return self._answer(Part(thinking=thinking), content, final=True)

    def _answer(self, part: Part, content: str, final: bool) -> Part:
        if self.tools is None:
            part.content = content
            return part
        part.content, part.tool_calls = self.tools.push(content) if content else ("", [])
        if final:
            more, more_calls = self.tools.flush()
            part.content += more
            part.tool_calls += more_calls
        return part


# gpt-oss's message markers (OpenAI's harmony format); <|return|> and <|call|> also end the
# generation (its EOS ids), so the stream mostly ends without them
_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_HARMONY_MESSAGE = "<|message|>"


class HarmonyReader:
    """OutputReader for gpt-oss's harmony output, which its own tokens structure:
    `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...`.
    The analysis channel is the thinking (dropped with `keep=False`: gpt-oss cannot stop
    thinking), the final channel the content, and a commentary message to `functions.NAME`
    (`<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>`,
    the recipient also allowed before the channel) a tool call whose JSON arguments complete at
    its end; commentary to no one (a preamble) is content. As Ollama's harmony parser reads it.
    A message's header is held until its <|message|>; its text streams, holding back only what
    could start a marker."""

    def __init__(self, keep_thinking: bool = True) -> None:
        self.keep_thinking = keep_thinking
        self._buffer = ""
        self._header: str | None = ""  # a message's header so far; None inside its text
        self._channel = ""
        self._recipient = ""
        self._arguments = ""
        self._index = 0

    def push(self, text: str) -> Part:
        self._buffer += text
        return self._read(final=False)

    def flush(self) -> Part:
        part = self._read(final=True)
        if self._header is None:  # cut off inside a message (num_predict, or its end token)
            self._add(part, self._buffer)
            self._buffer = ""
            self._end(part)
        elif self._header or self._buffer:  # a header that never opened its text: show it as it is
            part.content += self._header + self._buffer
            self._header, self._buffer = "", ""
        return part

    def _read(self, final: bool) -> Part:
        part = Part()
        while self._buffer:
            if self._header is not None:
                header = self._header + self._buffer
                i = header.find(_HARMONY_MESSAGE)
                if i < 0:
                    self._header, self._buffer = header, ""
                    break
                self._open(header[:i])
                self._buffer = header[i + len(_HARMONY_MESSAGE):]
                continue
            found = [(i, m) for m in _HARMONY_ENDS if (i := self._buffer.find(m)) >= 0]
            if not found:
                hold = 0 if final else max(_partial_suffix(self._buffer, m) for m in _HARMONY_ENDS)
                cut = len(self._buffer) - hold
                self._add(part, self._buffer[:cut])
                self._buffer = self._buffer[cut:]
                break
            i, marker = min(found)
            self._add(part, self._buffer[:i])
            self._buffer = self._buffer[i + (0 if marker == "<|start|>" else len(marker)):]
            self._end(part)
        return part

    def _open(self, header: str) -> None:
        """A message's header: `[<|start|>assistant][ to=R]<|channel|>C[ to=R][ <|constrain|>json]`."""
        self._header = None
        header = header.replace("<|start|>", " ").replace("<|constrain|>", " ").replace(HARMONY_CHANNEL,
                                                                                      f" {HARMONY_CHANNEL} ")
        channel = header.split(HARMONY_CHANNEL, 1)[1] if HARMONY_CHANNEL in header else ""
        self._channel = (channel.split() or [""])[0]
        self._recipient = next((w[3:] for w in header.split() if w.startswith("to=")), "")
        self._arguments = ""

    def _add(self, part: Part, text: str) -> None:
        if not text:
            return
        if self._recipient:
            self._arguments += text
        elif self._channel == "analysis":
            if self.keep_thinking:
                part.thinking += text
        else:  # final, a preamble, or a channel this reader does not know
            part.content += text

    def _end(self, part: Part) -> None:
        """A message ended: a tool call goes out whole (its arguments not JSON: shown as text)."""
        if self._recipient:
            name = self._recipient.removeprefix("functions.")
            try:
                arguments = json.loads(self._arguments or "{}")
            except json.JSONDecodeError:
                arguments = None
            if isinstance(arguments, dict):
                part.tool_calls.append({"id": call_id(), "function": {"index": self._index, "name": name,
                                                                      "arguments": arguments}})
                self._index += 1
            else:
                part.content += self._arguments
        self._header, self._channel, self._recipient, self._arguments = "", "", "", ""
