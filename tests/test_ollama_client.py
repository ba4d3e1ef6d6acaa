"""The official `ollama` Python client against the live daemon."""

from __future__ import annotations

import ollama
import pytest

from tinymodels import SCRIPT_TEXT


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
    assert "tiny:latest" not in names  # aliases resolve but are not listed
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
