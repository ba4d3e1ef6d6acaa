"""The official `ollama` Python client against the live daemon."""

from __future__ import annotations

from typing import Literal

import ollama
import pytest
from pydantic import BaseModel

from tinymodels import ANSWER_TEXT, SCRIPT_TEXT, THINKING_TEXT, TOOL_CALL_ARGUMENTS, WEATHER_TOOL


@pytest.fixture()
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


def test_generate_non_streaming(client):
    r = client.generate(model="tiny:scripted", prompt="hi")
    assert r.response == SCRIPT_TEXT and r.done and r.done_reason == "stop"
    assert r.eval_count == 9 and r.context


def test_generate_streaming(client):
    parts = list(client.generate(model="tiny:scripted", prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == SCRIPT_TEXT
    assert parts[-1].done and parts[-1].total_duration > 0


def test_chat_non_streaming_and_streaming(client):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat(model="tiny:scripted", messages=msgs)
    assert r.message.role == "assistant" and r.message.content == SCRIPT_TEXT
    parts = list(client.chat(model="tiny:scripted", messages=msgs, stream=True))
    assert "".join(p.message.content for p in parts) == SCRIPT_TEXT and parts[-1].done


def test_chat_options_and_stop(client):
    r = client.chat(model="tiny:scripted", messages=[{"role": "user", "content": "hi"}],
                    options={"stop": ["STOP"], "temperature": 0})
    assert r.message.content == "Hello world " and r.done_reason == "stop"


def test_list_and_show(client):
    names = [m.model for m in client.list().models]
    assert "tiny:scripted" in names and "tiny:random" in names and "smollm2:135m" in names
    assert "tiny:latest" in names and "smollm2:latest" in names  # every name that resolves, as in Ollama
    info = client.show("tiny:scripted")
    assert info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.context_length"] == 2048
    assert info.details.format == "safetensors" and "completion" in info.capabilities
    assert "<|im_start|>" in info.template


def test_unknown_model_raises_404(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="does-not-exist", prompt="hi")
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="does-not-exist", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.show("does-not-exist")
    assert err.value.status_code == 404


def test_ps_after_use(client):
    client.generate(model="tiny:scripted", prompt="hi", keep_alive="10m")
    running = {m.model: m for m in client.ps().models}
    assert "tiny:scripted" in running
    assert running["tiny:scripted"].context_length == 2048 and running["tiny:scripted"].size > 0


# --- tools, thinking and format (tiny models with tool / thinking templates) -----------------

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_call_non_streaming(client):
    r = client.chat(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL])
    assert r.message.content == "" and r.done_reason == "stop"
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == TOOL_CALL_ARGUMENTS


def test_tool_call_streaming_goes_out_whole(client):
    parts = list(client.chat(model="tiny:tools", messages=ASK, tools=[WEATHER_TOOL], stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    assert with_calls[0].message.tool_calls[0].function.arguments == TOOL_CALL_ARGUMENTS
    assert "".join(p.message.content for p in parts) == "" and parts[-1].done


def test_tool_results_render_back(client):
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
    ]
    r = client.chat(model="tiny:tools", messages=history, tools=[WEATHER_TOOL], options={"num_predict": 1})
    assert r.done  # the template rendered the call and its result
    rendered = client._client.post("/api/chat", json={
        "model": "tiny:tools", "messages": history, "tools": [WEATHER_TOOL], "_debug_render_only": True}).json()
    text = rendered["_debug_info"]["rendered_template"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>18 degrees and sunny</tool_response>" in text


def test_tools_on_a_model_without_them(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny:scripted", messages=ASK, tools=[WEATHER_TOOL])
    assert err.value.status_code == 400 and "does not support tools" in err.value.error
    assert "tools" in client.show("tiny:tools").capabilities
    assert "tools" not in client.show("tiny:scripted").capabilities


@pytest.mark.parametrize("think, thinking", [(None, THINKING_TEXT), (True, THINKING_TEXT), ("high", THINKING_TEXT),
                                             (False, None)])
def test_thinking_chat_and_generate(client, think, thinking):
    r = client.chat(model="tiny:thinker", messages=ASK, think=think)
    assert r.message.thinking == thinking and r.message.content == ANSWER_TEXT
    parts = list(client.chat(model="tiny:thinker", messages=ASK, think=think, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == (thinking or "")
    assert "".join(p.message.content for p in parts) == ANSWER_TEXT
    g = client.generate(model="tiny:thinker", prompt="What is the capital of France?", think=think)
    assert g.thinking == thinking and g.response == ANSWER_TEXT


def test_thinking_on_a_model_without_it(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny:scripted", messages=ASK, think=True)
    assert err.value.status_code == 400 and err.value.error == '"tiny:scripted" does not support thinking'
    assert client.chat(model="tiny:scripted", messages=ASK, think=False).message.content == SCRIPT_TEXT
    assert "thinking" in client.show("tiny:thinker").capabilities


class Reading(BaseModel):
    sensor: Literal["a", "b"]
    value: int
    ok: bool


@pytest.mark.parametrize("stream", [False, True])
def test_format_schema_steers_a_random_model(client, stream):
    """Random weights produce noise; the schema turns it into a valid object that ends."""
    kwargs = dict(model="tiny:random", messages=ASK, format=Reading.model_json_schema(),
                  options={"temperature": 1.0, "seed": 3, "num_predict": 200})
    if stream:
        parts = list(client.chat(stream=True, **kwargs))
        text, done_reason = "".join(p.message.content for p in parts), parts[-1].done_reason
    else:
        r = client.chat(**kwargs)
        text, done_reason = r.message.content, r.done_reason
    Reading.model_validate_json(text)
    assert done_reason == "stop"


def test_format_json_on_generate(client):
    r = client.generate(model="tiny:random", prompt="x", format="json",
                        options={"temperature": 0, "num_predict": 100})
    assert r.response.startswith("{")


def test_thinking_model_thinks_then_answers_in_the_format(client):
    r = client.chat(model="tiny:thinker", messages=ASK, format=Reading.model_json_schema(),
                    options={"num_predict": 100, "seed": 1})
    assert r.message.thinking == THINKING_TEXT
    Reading.model_validate_json(r.message.content)


def test_harmony_channels_are_thinking_content_and_tool_calls(client):
    """gpt-oss's harmony output (tiny models scripted to write it): the analysis channel is
    the thinking, the final channel the answer, a commentary message to functions.NAME a tool
    call, through chat (streaming or not) and generate, as Ollama reads gpt-oss."""
    assert {"thinking", "tools"} <= set(client.show("tiny:harmony").capabilities)
    r = client.chat(model="tiny:harmony", messages=ASK)
    assert (r.message.thinking, r.message.content) == (THINKING_TEXT, ANSWER_TEXT)
    parts = list(client.chat(model="tiny:harmony", messages=ASK, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THINKING_TEXT
    assert "".join(p.message.content for p in parts) == ANSWER_TEXT
    g = client.generate(model="tiny:harmony", prompt="What is the capital of France?")
    assert (g.thinking, g.response) == (THINKING_TEXT, ANSWER_TEXT)
    assert client.chat(model="tiny:harmony", messages=ASK, think=False).message.thinking is None
    r = client.chat(model="tiny:harmony-tools", messages=ASK, tools=[WEATHER_TOOL])
    assert r.message.thinking == "Need the weather." and not r.message.content
    assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls] == [
        ("get_weather", TOOL_CALL_ARGUMENTS)]
