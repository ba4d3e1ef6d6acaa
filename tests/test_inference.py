"""/api/generate and /api/chat over HTTP against the live daemon, with the tiny models."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tinymodels import SCRIPT_TEXT

SCRIPTED, RANDOM = "tiny:scripted", "tiny:random"


def post(daemon, path: str, body, timeout: float = 120) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(daemon.url + path, content=content, timeout=timeout)


def stream_lines(daemon, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", daemon.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        raw = [line for line in r.iter_lines()]
    assert all(raw), "no blank lines in NDJSON"
    return [json.loads(line) for line in raw]


METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")


def test_generate_stream_lines_and_final_metrics(daemon):
    lines = stream_lines(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi"})
    assert all(ln["model"] == SCRIPTED and ln["created_at"].endswith("Z") for ln in lines)
    assert [ln["done"] for ln in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["response"] == ""
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in METRICS)
    assert final["eval_count"] == 9  # 8 script tokens + EOS
    assert isinstance(final["context"], list) and len(final["context"]) == final["prompt_eval_count"] + 9
    assert "".join(ln["response"] for ln in lines) == SCRIPT_TEXT


def test_generate_non_streaming_concatenates(daemon):
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["response"] == SCRIPT_TEXT and body["done"] is True and body["done_reason"] == "stop"
    assert all(k in body for k in METRICS) and "context" in body


def test_chat_every_line_carries_message(daemon):
    lines = stream_lines(daemon, "/api/chat", {"model": SCRIPTED, "messages": [{"role": "user", "content": "hi"}]})
    assert all(ln["message"]["role"] == "assistant" for ln in lines)
    assert "".join(ln["message"]["content"] for ln in lines) == SCRIPT_TEXT
    assert "context" not in lines[-1] and lines[-1]["done_reason"] == "stop"


def test_stop_sequence_split_across_tokens_is_neither_streamed_nor_returned(daemon):
    body = {"model": SCRIPTED, "prompt": "hi", "options": {"stop": ["STOP"]}}
    lines = stream_lines(daemon, "/api/generate", body)
    streamed = [ln["response"] for ln in lines]
    assert "".join(streamed) == "Hello world "
    assert not any("ST" in s for s in streamed)
    assert lines[-1]["done_reason"] == "stop"
    r = post(daemon, "/api/generate", {**body, "stream": False}).json()
    assert r["response"] == "Hello world " and r["done_reason"] == "stop"


def test_partial_stop_prefix_is_released_when_it_cannot_match(daemon):
    lines = stream_lines(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "options": {"stop": ["STX"]}})
    assert "".join(ln["response"] for ln in lines) == SCRIPT_TEXT


def test_utf8_character_split_across_tokens_is_never_streamed_in_halves(daemon):
    lines = stream_lines(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi"})
    pieces = [ln["response"] for ln in lines]
    assert all("\ufffd" not in p for p in pieces)
    assert any("é" in p for p in pieces)


def test_num_predict_gives_length(daemon):
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False,
                                      "options": {"num_predict": 2}}).json()
    assert r["done_reason"] == "length" and r["eval_count"] == 2 and r["response"] == "Hello world"


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.5, "seed": 42, "top_k": 0, "top_p": 1}])
def test_determinism(daemon, options):
    body = {"model": RANDOM, "prompt": "Hello", "stream": False, "options": {**options, "num_predict": 24}}
    first = post(daemon, "/api/generate", body).json()["response"]
    second = post(daemon, "/api/generate", body).json()["response"]
    assert first == second and first


def test_different_seeds_differ(daemon):
    outs = {post(daemon, "/api/generate", {"model": RANDOM, "prompt": "Hello", "stream": False,
                                          "options": {"temperature": 1.5, "top_k": 0, "top_p": 1, "seed": s,
                                                      "num_predict": 24}}).json()["response"] for s in range(4)}
    assert len(outs) > 1


def test_system_and_raw_and_context(daemon):
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "system": "be brief", "stream": False,
                                      "_debug_render_only": True}).json()
    assert r["_debug_info"]["rendered_template"] == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    raw = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "abc", "raw": True, "stream": False}).json()
    assert "context" not in raw
    first = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False}).json()
    follow = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "again", "stream": False,
                                           "context": first["context"]}).json()
    assert follow["prompt_eval_count"] > len(first["context"])
    assert follow["context"][:len(first["context"])] == first["context"]


def test_go_template_in_request(daemon):
    tmpl = "{{ if .System }}S:{{ .System }} {{ end }}U:{{ .Prompt }} A:"
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "system": "sys", "template": tmpl,
                                      "stream": False, "_debug_render_only": True}).json()
    assert r["_debug_info"]["rendered_template"] == "S:sys U:hi A:"


def test_load_and_unload_paths(daemon):
    r = post(daemon, "/api/generate", {"model": SCRIPTED}).json()
    assert r["done"] is True and r["done_reason"] == "load" and r["response"] == ""
    r = post(daemon, "/api/chat", {"model": SCRIPTED, "messages": []}).json()
    assert r["done_reason"] == "load" and r["message"] == {"role": "assistant", "content": ""}
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "keep_alive": 0}).json()
    assert r["done_reason"] == "unload"
    r = post(daemon, "/api/chat", {"model": SCRIPTED, "keep_alive": "0s"}).json()
    assert r["done_reason"] == "unload" and r["message"]["role"] == "assistant"
    assert post(daemon, "/api/generate", {"model": "nope", "keep_alive": 0}).status_code == 404


def test_truncation_drops_oldest_turns(daemon):
    filler = "the quick brown fox " * 60  # ~240 tokens per message with this tokenizer
    messages = []
    for i in range(12):
        messages += [{"role": "user", "content": f"{i} {filler}"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "last question"})
    body = {"model": SCRIPTED, "messages": [{"role": "system", "content": "SYS"}] + messages, "stream": False,
            "options": {"num_ctx": 1024}}
    r = post(daemon, "/api/chat", body).json()
    assert r["done"] and r["prompt_eval_count"] < 1024
    rendered = post(daemon, "/api/chat", {**body, "_debug_render_only": True}).json()
    assert "0 the quick" in rendered["_debug_info"]["rendered_template"]  # render-only shows everything
    too_long = post(daemon, "/api/chat", {**body, "truncate": False})
    assert too_long.status_code == 400 and "context length" in too_long.json()["error"]


def test_logprobs(daemon):
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False, "logprobs": True,
                                      "top_logprobs": 3}).json()
    assert len(r["logprobs"]) == 8
    first = r["logprobs"][0]
    assert first["token"] == "Hello" and first["logprob"] <= 0 and len(first["top_logprobs"]) == 3
    assert first["bytes"] == list(b"Hello")


def test_server_answers_while_generating(daemon):
    with httpx.stream("POST", daemon.url + "/api/generate", timeout=60,
                      json={"model": RANDOM, "prompt": "Hello", "options": {"num_predict": 400, "temperature": 0}}) as r:
        lines = r.iter_lines()
        next(lines)
        t = time.perf_counter()
        assert httpx.get(daemon.url + "/", timeout=10).text == "Ollama is running"
        assert time.perf_counter() - t < 2.0


def test_disconnect_mid_stream_then_new_request_succeeds(daemon):
    body = json.dumps({"model": RANDOM, "prompt": "Hello", "options": {"num_predict": 1000, "temperature": 0}})
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.sendall((f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                  f"Content-Type: application/json\r\n\r\n{body}").encode())
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    deadline = time.time() + 30
    runtimes = {}
    while time.time() < deadline:  # the slot is freed within a step of the disconnect
        runtimes = {r.resolved.name.display: r for r in daemon.services.models.residents()}
        if runtimes.get(RANDOM) and runtimes[RANDOM].runtime.runner.busy == 0:
            break
        time.sleep(0.1)
    assert runtimes[RANDOM].runtime.runner.busy == 0
    r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False})
    assert r.status_code == 200 and r.json()["response"] == SCRIPT_TEXT


MALFORMED = [
    # (path, body, status, error text or None for "any")
    ("/api/generate", b"", 400, "missing request body"),
    ("/api/generate", b"   ", 400, "missing request body"),
    ("/api/generate", b"{", 400, "unexpected EOF"),
    ("/api/generate", b"xyz", 400, "invalid character 'x' looking for beginning of value"),
    ("/api/generate", b"[]", 400, "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
    ("/api/generate", b'{"model":1}', 400,
     "json: cannot unmarshal number into Go struct field GenerateRequest.model of type string"),
    ("/api/generate", b'{"prompt":"hi"}', 404, "model '' not found"),
    ("/api/generate", b'{"model":"nope","prompt":"hi"}', 404, "model 'nope' not found"),
    ("/api/generate", b'{"model":"bad name!","prompt":"hi"}', 404, "model 'bad name!' not found"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","options":{"temperature":"hot"}}', 500,
     'option "temperature" must be of type float32'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","options":{"num_predict":"x"}}', 500,
     'option "num_predict" must be of type integer'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","options":{"stop":"x"}}', 500,
     'option "stop" must be of type array'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","keep_alive":"-1"}', 400,
     'time: missing unit in duration "-1"'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","keep_alive":true}', 400, "Unsupported type: 'bool'"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","raw":true,"system":"x"}', 400,
     "raw mode does not support template, system, or context"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","top_logprobs":21}', 400,
     "top_logprobs must be between 0 and 20"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","think":true}', 400,
     '"tiny:scripted" does not support thinking'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","think":"hot"}', 400,
     'invalid think value: "hot" (must be "high", "medium", "low", "max", true, or false)'),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","suffix":"x"}', 400,
     "registry.ollama.ai/library/tiny:scripted does not support insert"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","images":["data:image/png;base64,AA"]}', 400,
     "illegal base64 data at input byte 4"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","context":["a"]}', 400,
     "json: cannot unmarshal string into Go struct field GenerateRequest.context of type int"),
    ("/api/chat", b"", 400, "missing request body"),
    ("/api/chat", b'{"messages":[]}', 400, "model is required"),
    ("/api/chat", b'{"model":"nope","messages":[]}', 404, "model 'nope' not found"),
    ("/api/chat", b'{"model":"tiny:scripted","messages":"hi"}', 400,
     "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"),
    ("/api/chat", b'{"model":"tiny:scripted","messages":[{"role":"user","content":5}]}', 400,
     "json: cannot unmarshal number into Go struct field ChatRequest.messages.content of type string"),
    ("/api/chat", b'{"model":"tiny:scripted","messages":[{"role":"user","content":"x"}],'
                  b'"tools":[{"type":"function","function":{"name":"f"}}]}', 400,
     "registry.ollama.ai/library/tiny:scripted does not support tools"),
    ("/api/chat", b'{"model":"tiny:scripted","messages":[{"role":"user","content":"x"}],"format":5}', 400, None),
    ("/api/show", b"{}", 400, "model is required"),
    ("/api/show", b'{"model":"nope"}', 404, "model 'nope:latest' not found"),
    ("/api/show", b'{"model":"a/b/c/d"}', 400, "invalid model name"),
]


@pytest.mark.parametrize("path,body,status,error", MALFORMED, ids=[f"{p}:{b[:40]!r}" for p, b, _, _ in MALFORMED])
def test_malformed_requests_get_documented_errors(daemon, path, body, status, error):
    r = post(daemon, path, body)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    if error is not None:
        assert r.json() == {"error": error}
    else:
        assert isinstance(r.json()["error"], str)
    assert httpx.get(daemon.url + "/", timeout=10).status_code == 200


@pytest.mark.parametrize("method,path,status,text", [
    ("GET", "/nope", 404, "404 page not found"),
    ("GET", "/api/generate", 405, "405 method not allowed"),
    ("DELETE", "/api/tags", 405, "405 method not allowed"),
    ("HEAD", "/api/ps", 405, ""),
])
def test_unknown_paths_and_methods(daemon, method, path, status, text):
    r = httpx.request(method, daemon.url + path, timeout=10)
    assert r.status_code == status and r.text == text
