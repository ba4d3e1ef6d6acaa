"""The /v1 endpoints (server/handlers/openai.py) through the official `openai` client and
raw SSE, against the live daemon on the tiny scripted model and all-MiniLM."""

from __future__ import annotations

import base64
import json
import math
import struct

import httpx
import openai
import pytest

from aiohttp.test_utils import TestClient, TestServer

from conftest import make_settings
from daemon.registry.catalog import Catalog
from daemon.registry.registry import Registry
from daemon.server.app import create_app
from tinymodels import ANSWER_TEXT, SCRIPT_TEXT, THINKING_TEXT, TOOL_CALL_ARGUMENTS, WEATHER_TOOL

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert {"tiny:scripted", "smollm2:135m", "all-minilm:l6-v2"} <= set(ids)
    model = client.models.retrieve("tiny:scripted")
    assert model.id == "tiny:scripted" and model.owned_by == "library" and model.created > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


async def test_models_list_is_an_empty_array_without_models(tmp_path, tiny_dirs):
    """Ollama answers `"data": null` here, which breaks clients that iterate it."""
    empty = tmp_path / "no-modelfiles"
    empty.mkdir()
    app = create_app(make_settings(tmp_path, tiny_dirs), catalog=Catalog(Registry([empty]), None))
    async with TestClient(TestServer(app)) as http:
        r = await http.get("/v1/models")
        assert await r.json() == {"object": "list", "data": []}


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny:scripted", messages=USER)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.system_fingerprint == "fp_ollama"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == SCRIPT_TEXT
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 9 and r.usage.total_tokens == r.usage.prompt_tokens + 9


def test_chat_completion_streaming_sequence(client):
    stream = client.chat.completions.create(model="tiny:scripted", messages=USER, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == SCRIPT_TEXT
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == "stop" and finish.delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_streaming_raw_sse_framing(daemon):
    body = {"model": "tiny:scripted", "messages": USER, "stream": True}
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]  # no usage unless asked
    assert "usage" not in last


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_gives_length(client, limit):
    r = client.chat.completions.create(model="tiny:scripted", messages=USER, **{limit: 2})
    assert r.choices[0].message.content == "Hello world" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("stop", ["STOP", ["nothing", "STOP"]])
def test_stop(client, stop):
    r = client.chat.completions.create(model="tiny:scripted", messages=USER, stop=stop)
    assert r.choices[0].message.content == "Hello world " and r.choices[0].finish_reason == "stop"


def test_completions(client):
    r = client.completions.create(model="tiny:scripted", prompt="hi")
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == SCRIPT_TEXT and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny:scripted", prompt="hi", max_tokens=1)
    assert r.choices[0].text == "Hello" and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny:scripted", prompt="hi", stream=True, stop="STOP"))
    assert "".join(c.choices[0].text for c in chunks) == "Hello world "
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny:scripted", prompt="hi", max_tokens=2, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["Hello", " world"] and len(lp.token_logprobs) == 2 and lp.text_offset == [0, 5]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny:scripted", messages=USER, max_tokens=2, logprobs=True,
                                       top_logprobs=1)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", " world"] and len(content[0].top_logprobs) == 1


def test_errors_are_openai_objects(client, daemon):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=USER)
    assert err.value.body["type"] == "not_found_error" and "model 'nope' not found" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny:scripted", messages=[])
    assert err.value.body == {"message": "[] is too short - 'messages'", "type": "invalid_request_error",
                              "param": None, "code": None}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="all-minilm", messages=USER)
    assert err.value.body["message"] == '"all-minilm" does not support chat'
    r = httpx.post(daemon.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_embeddings_float_and_base64(client):
    floats = client.embeddings.create(model="all-minilm", input=["Why is the sky blue?", "Paris"])
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    assert math.fsum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    packed = client.embeddings.create(model="all-minilm", input="Why is the sky blue?", encoding_format="base64")
    raw = packed.data[0].embedding
    if isinstance(raw, str):  # the client decodes base64 itself in some versions
        raw = list(struct.unpack("<384f", base64.b64decode(raw)))
    assert raw == pytest.approx(floats.data[0].embedding, abs=1e-6)
    short = client.embeddings.create(model="all-minilm", input="Paris", dimensions=16)
    assert len(short.data[0].embedding) == 16


@pytest.mark.parametrize("body, error", [
    ({"model": "all-minilm"}, "invalid input"),
    ({"model": "all-minilm", "input": []}, "invalid input"),
    ({"model": "all-minilm", "input": "x", "encoding_format": "int8"},
     "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64']."),
])
def test_embedding_errors(daemon, body, error):
    r = httpx.post(daemon.url + "/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["message"] == error


# --- tools, reasoning and response_format ---------------------------------------------------

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_non_streaming(client):
    r = client.chat.completions.create(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_CALL_ARGUMENTS


def test_tool_calls_streaming(client):
    chunks = list(client.chat.completions.create(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL],
                                                 stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == TOOL_CALL_ARGUMENTS  # whole, one chunk
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    r = client.chat.completions.create(model="tiny:tools", messages=history, tools=[WEATHER_TOOL], max_tokens=1)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_choice_forces_a_call_from_a_random_model(client, tool_choice):
    """Random weights never write a tool call by themselves; tool_choice constrains them to one."""
    for seed in range(3):
        r = client.chat.completions.create(model="tiny:tools-random", messages=ASK, tools=[WEATHER_TOOL],
                                           tool_choice=tool_choice, seed=seed)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
        assert r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_means_no_call(client):
    r = client.chat.completions.create(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL], tool_choice="none",
                                       max_tokens=5)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def test_reasoning(client):
    r = client.chat.completions.create(model="tiny:thinker", messages=ASK)
    message = r.choices[0].message
    assert message.content == ANSWER_TEXT and message.model_extra["reasoning"] == THINKING_TEXT
    chunks = list(client.chat.completions.create(model="tiny:thinker", messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning") or "" for d in deltas) == THINKING_TEXT
    assert "".join(d.content or "" for d in deltas) == ANSWER_TEXT
    off = client.chat.completions.create(model="tiny:thinker", messages=ASK, reasoning_effort="none")
    assert off.choices[0].message.content == ANSWER_TEXT and "reasoning" not in off.choices[0].message.model_extra


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"]}
    r = client.chat.completions.create(model="tiny:random", messages=ASK, seed=4, max_tokens=100,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "n", "schema": schema}})
    assert 0 <= json.loads(r.choices[0].message.content)["n"] <= 99 and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny:random", messages=ASK, seed=4, max_tokens=100,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
