"""Constrained decoding (engine/grammar.py): grammars for format / tool calls / thinking,
masks in the decode step, and the real SmolLM2 producing schema-valid JSON at
temperature 0.8 through /api/chat, every time."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import ollama
import pytest
import torch

from daemon.engine.grammar import GrammarCompiler, Masker, entry, harmony_entry, json_answer, tool_call_answer
from daemon.errors import BadRequest
from tinymodels import THINKING, THINKING_SCRIPT, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(THINKING_SCRIPT, THINKING)  # <think> and </think> are tokens of their own


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, [tokenizer.eos_token_id])


def admits(compiler: GrammarCompiler, grammar: str, ids: list[int]) -> tuple[bool, bool]:
    """Steps through `ids` as the runner would (mask, check, accept): (all allowed, finished)."""
    constraint = compiler.compile(grammar).matcher()
    masker = Masker()
    for token in ids:
        logits = torch.zeros(2, len(compiler._hf_tokenizer) + 5)  # a model may be wider than its tokenizer
        masker.apply(logits, masker.fill([None, constraint]))
        assert torch.all(logits[0] == 0), "an unconstrained row is left alone"
        assert torch.all(logits[1, -5:] == float("-inf"))
        if logits[1, token] != 0:
            return False, False
        constraint.accept(token)
    return True, constraint.finished


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["n"], "additionalProperties": False}


@pytest.mark.parametrize("schema, text, ok", [
    (None, '{"a":[1,{"b":null}],"c":"x"}', True),
    (None, '[1,2]', False),  # JSON mode is an object, as Ollama's
    (None, '{ "a":1}', False),  # no free whitespace: it cannot run on forever
    (SCHEMA, '{"n":3,"tags":["a","b"]}', True),
    (SCHEMA, '{"n":3,"x":1}', False),
    (SCHEMA, '{"tags":[]}', False),
    ({"$defs": {"p": {"type": "string", "maxLength": 3}}, "type": "array", "items": {"$ref": "#/$defs/p"}},
     '["abc","d"]', True),
    ({"$defs": {"p": {"type": "string", "maxLength": 3}}, "type": "array", "items": {"$ref": "#/$defs/p"}},
     '["abcd"]', False),
])
def test_json_answers(compiler, tokenizer, schema, text, ok):
    allowed, finished = admits(compiler, entry(json_answer(schema), None), text_ids(tokenizer, text))
    assert allowed == ok
    if ok:
        assert finished, "the value closed: the generation ends there"


@pytest.mark.parametrize("format_, error", [
    ({"type": "nonsense"}, "invalid format: invalid JSON schema: Invalid type: nonsense"),
    ({"$ref": "#/$defs/missing"}, "invalid format: invalid JSON schema"),
    (5, 'invalid format: 5; expected "json" or a valid JSON Schema object'),
])
def test_invalid_schemas_are_bad_requests(compiler, format_, error):
    with pytest.raises(BadRequest) as err:
        compiler.compile(entry(json_answer(format_), None))
    assert str(err.value).startswith(error)


def test_thinking_first_then_the_answer(compiler, tokenizer):
    think, end = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</think>")
    assert compiler.literal("<think>") == f"<[{think}]>" and compiler.literal("{") == '"{"'
    free = text_ids(tokenizer, "so { is not JSON yet")
    answer = text_ids(tokenizer, '{"n":1}')
    optional = entry(json_answer(SCHEMA), "optional", compiler.literal)
    assert admits(compiler, optional, [think] + free + [end] + text_ids(tokenizer, "\n") + answer) == (True, True)
    assert admits(compiler, optional, answer) == (True, True)  # thinking is optional
    assert admits(compiler, optional, free)[0] is False  # but free text only inside it
    inside = entry(json_answer(SCHEMA), "inside", compiler.literal)
    assert admits(compiler, inside, free + [end] + answer) == (True, True)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now"}}]


@pytest.mark.parametrize("dialect, only, text, ok", [
    ("hermes", None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True),
    ("hermes", None, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', True),
    ("hermes", None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', False),
    ("hermes", None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": 1}}\n</tool_call>',
     False),
    ("hermes", "now", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', False),
    ("llama3", None, '{"name": "get_weather", "parameters": {"city": "Tokyo"}}', True),
    ("mistral", None, '[TOOL_CALLS][{"name": "now", "arguments": {}}]', True),
    ("hermes", None, "I'd rather talk.", False),
])
def test_required_tool_calls(compiler, tokenizer, dialect, only, text, ok):
    grammar = entry(tool_call_answer(dialect, TOOLS, only, compiler.literal), None)
    allowed, finished = admits(compiler, grammar, text_ids(tokenizer, text))
    assert allowed == ok and finished == ok


def test_tool_choice_naming_an_unknown_function():
    with pytest.raises(BadRequest, match="not in tools"):
        tool_call_answer("hermes", TOOLS, "nope")


HARMONY_MARKS = ["<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|constrain|>", "<|call|>", "<|return|>"]
THOUGHT = ["<|channel|>", "analysis", "<|message|>", "Need the weather.", "<|end|>", "<|start|>", "assistant"]
FINAL = ["<|channel|>", "final", "<|message|>"]
CALL = ["<|channel|>", "commentary to=functions.get_weather ", "<|constrain|>", "json", "<|message|>"]


@pytest.fixture(scope="module")
def harmony():
    """A tokenizer with gpt-oss's markers as special tokens of their own, as o200k_harmony has them."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": HARMONY_MARKS})
    return tok, GrammarCompiler(tok, [tok.convert_tokens_to_ids("<|return|>"), tok.convert_tokens_to_ids("<|call|>")])


@pytest.mark.parametrize("tool_call, parts, ok", [
    (False, [*THOUGHT, *FINAL, '{"n":3}'], True),
    (False, [*FINAL, '{"n":3,"tags":["a"]}'], True),  # the analysis message may be left out
    (False, [*THOUGHT, *FINAL, "Paris"], False),
    (False, ['{"n":3}'], False),  # no channel: not how it writes
    (False, [*THOUGHT, *CALL, '{"city": "Paris"}'], False),  # a format asks for the final message
    (True, [*THOUGHT, *CALL, '{"city": "Paris"}'], True),
    (True, [*THOUGHT, *CALL, '{"city": "Rome"}'], False),
    (True, [*THOUGHT, *FINAL, "It is sunny."], False),
])
def test_harmony_answers_keep_its_channels(harmony, tool_call, parts, ok):
    """gpt-oss (harmony) under a format or a required tool call: its analysis message free, then
    the answer as its final message, or the call as a commentary message to functions.NAME."""
    tok, compiler = harmony
    answer = tool_call_answer("harmony", TOOLS, None, compiler.literal) if tool_call else json_answer(SCHEMA)
    grammar = harmony_entry(answer, tool_call, compiler.literal)
    ids = [i for p in parts for i in ([tok.convert_tokens_to_ids(p)] if p in HARMONY_MARKS else text_ids(tok, p))]
    assert admits(compiler, grammar, ids) == (ok, ok)


# --- the real model -------------------------------------------------------------------------

def _s(maxlen: int = 24) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": maxlen}


SCHEMAS = [
    {"type": "object", "properties": {"name": _s(), "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"city": _s(), "country": _s(), "population": {"type": "integer", "minimum": 0,
                                                                                      "maximum": 50000000}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"$defs": {"address": {"type": "object", "properties": {"street": _s(), "zip": {"type": "string",
                                                                                     "pattern": "^[0-9]{5}$"}},
                           "required": ["street", "zip"]}},
     "type": "object", "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}},
     "required": ["home", "work"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "minItems": 3, "maxItems": 5},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": ["string", "null"],
                                                                           "maxLength": 30}},
     "required": ["ok", "reason"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                           {"type": "string", "maxLength": 10}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
     "required": ["temperature"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -99,
                                                                        "maximum": 99},
                                      "y": {"type": "integer", "minimum": -99, "maximum": 99}},
     "required": ["kind", "x", "y"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"title": _s(40), "subtitle": _s(40), "pages": {"type": "integer",
                                                                                      "minimum": 1, "maximum": 999}},
     "required": ["title"]},
    {"type": "array", "items": {"type": "object", "properties": {"name": _s(16), "done": {"type": "boolean"}},
                                "required": ["name", "done"], "additionalProperties": False},
     "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "profile": {"type": "object", "properties": {"handle": _s(12), "verified": {"type": "boolean"}},
                    "required": ["handle", "verified"]}}, "required": ["profile"]}}, "required": ["user"]},
    {"type": "object", "properties": {"priority": {"enum": [1, 2, 3]}, "label": {"enum": ["low", "mid", "high"]}},
     "required": ["priority", "label"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
     "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}}, "required": ["word"]},
    {"type": "array", "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}],
     "items": False, "minItems": 2},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["news", "sport", "tech"]},
                                               "minItems": 1, "maxItems": 3, "uniqueItems": False},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["tags", "score"]},
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}, "confidence": {
        "enum": ["low", "medium", "high"]}, "sources": {"type": "array", "items": _s(20), "maxItems": 2}},
     "required": ["answer", "confidence", "sources"]},
]
assert len(SCHEMAS) == 20


@pytest.mark.slow
def test_smollm2_output_validates_against_20_schemas(daemon):
    """Each schema at temperature 0.8, four at a time (the daemon's parallel slots)."""
    def one(job: tuple[int, dict]) -> tuple[dict, dict]:
        seed, schema = job
        r = httpx.post(daemon.url + "/api/chat", timeout=600, json={
            "model": "smollm2:135m", "stream": False, "format": schema,
            "options": {"temperature": 0.8, "seed": seed, "num_predict": 400},
            "messages": [{"role": "user", "content": "Reply with JSON for this schema: " + json.dumps(schema)}]})
        return schema, r.json()

    counts = []
    with ThreadPoolExecutor(4) as pool:
        for schema, reply in pool.map(one, enumerate(SCHEMAS)):
            assert reply.get("done_reason") == "stop", reply
            jsonschema.validate(json.loads(reply["message"]["content"]), schema)
            counts.append(reply["eval_count"])
    print("tokens per answer:", counts)


@pytest.mark.slow
def test_smollm2_json_mode_never_runs_on_whitespace(daemon):
    client = ollama.Client(host=daemon.url, timeout=600)
    for seed in range(3):
        r = client.generate(model="smollm2:135m", prompt="List three fruits as JSON.", format="json",
                            options={"temperature": 0.8, "seed": seed, "num_predict": 300})
        assert not any(ch in r.response for ch in "\n\t") and "  " not in r.response.replace('" "', "")
        if r.done_reason == "stop":
            assert isinstance(json.loads(r.response), dict)
        else:  # a long answer: cut by num_predict in the middle of content, never in whitespace
            assert r.eval_count == 300
