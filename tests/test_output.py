"""Reading model output (engine/output.py): thinking split from the answer, tool calls parsed
in each dialect, whatever way the text is cut into pieces."""

from __future__ import annotations

import pytest

from daemon.engine.output import HarmonyReader, OutputReader, ThinkingSplitter, ToolCallParser, call_id, dialect_for


def read(reader: OutputReader, text: str, size: int) -> tuple[str, str, list[dict]]:
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    parts = [reader.push(p) for p in pieces] + [reader.flush()]
    return ("".join(p.thinking for p in parts), "".join(p.content for p in parts),
            [c["function"] for p in parts for c in p.tool_calls])


SIZES = [1, 2, 3, 5, 8, 1000]
WEATHER = {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dialect, text, content, calls", [
    ("hermes", 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check. ", [WEATHER]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
               '<tool_call>{"name": "f", "arguments": {}}</tool_call>',
     "", [WEATHER, {"index": 1, "name": "f", "arguments": {}}]),
    ("hermes", "No tools needed: 1 < 2 and <b>bold</b>.", "No tools needed: 1 < 2 and <b>bold</b>.", []),
    ("hermes", '<tool_call>{"name": "get_weather", "argu', '<tool_call>{"name": "get_weather", "argu', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [WEATHER]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [WEATHER]),
    ("llama3", '  {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}',
     "", [WEATHER, {"index": 1, "name": "f", "arguments": {}}]),
    ("llama3", 'The answer is {"a": 1}.', 'The answer is {"a": 1}.', []),
    ("llama3", '{"a": 1} is JSON, not a call', '{"a": 1} is JSON, not a call', []),
    ("llama3", '{"name": "unknown_tool", "parameters": {}}', '{"name": "unknown_tool", "parameters": {}}', []),
    ("llama3", '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}', "", [WEATHER]),
])
def test_tool_calls(dialect, text, content, calls, size):
    reader = OutputReader(None, ToolCallParser(dialect, ["get_weather", "f"]))
    assert read(reader, text, size) == ("", content, calls)


def test_a_call_goes_out_whole_as_soon_as_it_closes():
    parser = ToolCallParser("hermes")
    assert parser.push('Hi <tool_call>{"name": "f", "arguments": {"a"') == ("Hi ", [])
    text, calls = parser.push(": 1}}</tool_call> after")
    assert text == " after" and calls[0]["function"] == {"index": 0, "name": "f", "arguments": {"a": 1}}
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 13


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("splitter, text, thinking, content", [
    (dict(), "<think>\nLet me see.\n</think>\n\nParis.", "Let me see.\n", "Paris."),
    (dict(), "  <think>a</think>b", "a", "b"),
    (dict(), "Paris, no thinking.", "", "Paris, no thinking."),
    (dict(), "Paris <think> later is content", "", "Paris <think> later is content"),
    (dict(inside=True), "so: a < b </think> Paris.", "so: a < b ", "Paris."),
    (dict(inside=True), "never closed", "never closed", ""),
    (dict(keep=False), "<think>hidden</think>Paris.", "", "Paris."),
    (dict(start="<seed:think>", end="</seed:think>"), "<seed:think>x</seed:think>y", "x", "y"),
])
def test_thinking(splitter, text, thinking, content, size):
    assert read(OutputReader(ThinkingSplitter(**splitter), None), text, size) == (thinking, content, [])


def test_thinking_then_tool_call():
    reader = OutputReader(ThinkingSplitter(), ToolCallParser("hermes"))
    text = '<think>I need the weather.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' \
           '</tool_call>'
    assert read(reader, text, 4) == ("I need the weather.", "", [WEATHER])


@pytest.mark.parametrize("template, configured, dialect", [
    ("... <tool_call> ...", None, "hermes"),
    ("... [TOOL_CALLS] ...", None, "mistral"),
    ("... tools ... ipython ...", None, "llama3"),
    ("... <tool_call> ...", "mistral", "mistral"),
    ("... <|start|>assistant<|channel|>final<|message|> ...", None, "harmony"),
])
def test_dialect_for(template, configured, dialect):
    assert dialect_for(template, configured) == dialect


def test_call_ids_are_distinct():
    assert len({call_id() for _ in range(100)}) == 100


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_',
])
def test_a_call_cut_off_after_its_json_closed_is_still_a_call(text, size):
    """num_predict ends the output before the end tag: Ollama's parser returns the call as
    soon as its JSON is whole, so this does too (not the markup as text)."""
    reader = OutputReader(None, ToolCallParser("hermes", ["get_weather"]))
    assert read(reader, text, size) == ("", "", [WEATHER])


# gpt-oss's output as it generates it after its template's `<|start|>assistant` (the stream ends
# before <|return|> / <|call|>, its EOS tokens, or with them)
HARMONY_CASES = [
    ("<|channel|>analysis<|message|>User asks capital. Simple.<|end|><|start|>assistant<|channel|>final"
     "<|message|>The capital of France is Paris.", True, "User asks capital. Simple.", "The capital of France is Paris.", []),
    ("<|channel|>analysis<|message|>a < b, so<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
     True, "a < b, so", "Paris.", []),
    ("<|channel|>analysis<|message|>hidden<|end|><|start|>assistant<|channel|>final<|message|>Paris.",
     False, "", "Paris.", []),
    ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
     ' <|constrain|>json<|message|>{"city": "Paris"}<|call|>', True, "Need weather.", "", [WEATHER]),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json"
     '<|message|>{"city": "Paris"}', True, "x", "", [WEATHER]),  # the recipient first; cut at its EOS
    ("<|channel|>commentary<|message|>Checking the weather first.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather<|message|>{"city": "Paris"}<|call|>', True, "", "Checking the weather first.", [WEATHER]),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
     "<|message|>{not json<|call|>", True, "x", "{not json", []),
    ("<|channel|>analysis<|message|>cut off mid-thought", True, "cut off mid-thought", "", []),
    ("Plain text, no channels.", True, "", "Plain text, no channels.", []),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("text, keep, thinking, content, calls", HARMONY_CASES)
def test_harmony(text, keep, thinking, content, calls, size):
    """gpt-oss's channels: analysis is the thinking, final the content, a commentary message to
    functions.NAME a tool call, however the text is cut into pieces."""
    assert read(HarmonyReader(keep_thinking=keep), text, size) == (thinking, content, calls)


def test_harmony_streams_the_answer_as_it_comes():
    reader = HarmonyReader()
    assert reader.push("<|channel|>analysis<|message|>Think") .thinking == "Think"
    assert reader.push("ing<|e").thinking == "ing"  # "<|e" may start <|end|>: held back
    part = reader.push("nd|><|start|>assistant<|channel|>final<|message|>Par")
    assert (part.thinking, part.content) == ("", "Par")
