"""/api/generate and /api/chat over HTTP against the live daemon, with the tiny models."""

from __future__ import annotations

import json
import os
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
    # the prompt was the context and then the new turn (whose start the prefix cache held)
    assert follow["context"][:len(first["context"])] == first["context"]
    assert len(follow["context"]) > len(first["context"]) + follow["eval_count"]
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
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","options":{"top_k":9223372036854775808}}', 400,
     "json: cannot unmarshal number 9223372036854775808 into Go struct field Options.top_k of type int"),
    ("/api/chat", b'{"model":"tiny:scripted","messages":[{"role":"user","content":"x"}],'
                  b'"options":{"temperature":1e300}}', 400,
     "json: cannot unmarshal number 1e+300 into Go struct field Options.temperature of type float32"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","top_logprobs":9223372036854775808}', 400,
     "json: cannot unmarshal number 9223372036854775808 into Go struct field GenerateRequest.top_logprobs of type int"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","format":' + b"[" * 100000 + b"]" * 100000 + b"}",
     400, "exceeded max depth"),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","template":"{% include \'x.j2\' %}"}', 400, None),
    ("/api/generate", b'{"model":"tiny:scripted","prompt":"hi","template":"[INST] {{ .Prompt "}', 400,
     "template: :1: unclosed action"),
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


def test_a_top_k_past_int64_is_refused_and_the_slot_stays_free(daemon):
    """The request that once wedged a slot forever: refused before it reaches the sampler, and
    the largest top_k that fits is served."""
    r = post(daemon, "/api/generate", {"model": RANDOM, "prompt": "hi", "options": {"top_k": 2**63}})
    assert r.status_code == 400
    r = post(daemon, "/api/generate", {"model": RANDOM, "prompt": "hi", "stream": False,
                                       "options": {"top_k": 2**63 - 1, "num_predict": 3, "seed": 1}})
    assert r.status_code == 200 and r.json()["eval_count"] == 3


def test_num_ctx_minus_one_is_the_default_context(daemon):
    """It used to cut the prompt to 5 tokens."""
    def count(options):
        r = post(daemon, "/api/generate", {"model": SCRIPTED, "prompt": "hello " * 50, "stream": False,
                                           "options": options})
        assert r.status_code == 200
        return len(r.json()["context"]) - r.json()["eval_count"]  # the prompt, cached part included

    assert count({"num_ctx": -1}) == count({}) > 50


def test_a_million_messages_are_answered_at_once_and_nothing_is_left_running(daemon):
    body = json.dumps({"model": SCRIPTED, "stream": False,
                       "messages": [{"role": "user", "content": "hi"}] * 1_000_000}).encode()
    started = time.perf_counter()
    r = post(daemon, "/api/chat", body)
    assert time.perf_counter() - started < 2.0
    assert r.status_code == 400 and "too many messages: 1000000" in r.json()["error"]
    r = post(daemon, "/api/chat", {"model": SCRIPTED, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["message"]["content"] == SCRIPT_TEXT


def test_long_conversations_and_huge_prompts_cost_what_the_context_costs(daemon):
    """50,000 turns, or a 50 MB prompt, in a context of 2,048: cut as Ollama cuts them, in
    seconds, with the event loop free meanwhile (the body is parsed on a worker thread)."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 20}
             for i in range(50_000)] + [{"role": "user", "content": "the last question"}]
    for path, body in (("/api/chat", {"model": RANDOM, "messages": turns}),
                       ("/api/generate", {"model": RANDOM, "prompt": "the quick brown fox " * 2_500_000})):
        started = time.perf_counter()
        with httpx.stream("POST", daemon.url + path, timeout=60,
                          json={**body, "options": {"num_predict": 2, "temperature": 0}}) as r:
            heartbeat = httpx.get(daemon.url + "/", timeout=5)  # answered while the big body is handled
            lines = [json.loads(line) for line in r.iter_lines()]
        assert heartbeat.status_code == 200 and r.status_code == 200
        assert lines[-1]["done"] and 1000 < lines[-1]["prompt_eval_count"] < 2048
        assert time.perf_counter() - started < 15


def test_a_client_that_leaves_while_its_prompt_is_built_leaves_no_work_behind(daemon):
    """Big bodies whose clients leave at once: the work they cause is bounded (parsing what was
    sent), then nothing: no prompt, no decoding, no CPU."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the daemon's threads are this process's
        return usage.ru_utime + usage.ru_stime

    assert post(daemon, "/api/generate", {"model": RANDOM, "keep_alive": "1h"}).status_code == 200  # loaded
    turns = [{"role": "user", "content": f"turn {i} " + "word " * 30} for i in range(60_000)]
    bodies = [json.dumps({"model": RANDOM, "messages": turns, "options": {"num_predict": 100000}}),
              json.dumps({"model": RANDOM, "messages": [{"role": "user", "content": "hi"}] * 1_000_000})]
    for body in bodies:
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        sock.sendall((f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Type: application/json\r\n\r\n{body}").encode())
        sock.close()
    deadline, quiet = time.monotonic() + 20, False
    while time.monotonic() < deadline and not quiet:
        before = cpu()
        time.sleep(0.5)
        quiet = cpu() - before < 0.1
    assert quiet, "the daemon kept working after its clients left"
    runner = {r.resolved.name.display: r for r in daemon.services.models.residents()}[RANDOM].runtime.runner
    assert runner.busy == 0


def test_a_body_over_the_limit_is_413_and_blobs_have_no_limit(tmp_path, tiny_dirs, monkeypatch):
    import hashlib

    import daemon.server.app as app_module
    import daemon.server.wire as wire
    from conftest import make_settings, run_daemon

    monkeypatch.setattr(app_module, "MAX_JSON_BODY", 1 << 20)
    monkeypatch.setattr(wire, "MAX_JSON_BODY", 1 << 20)
    for handle in run_daemon(make_settings(tmp_path, tiny_dirs)):
        for path in ("/api/generate", "/v1/chat/completions"):
            r = post(handle, path, {"model": SCRIPTED, "prompt": "x" * (2 << 20),
                                    "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 413
            message = r.json()["error"] if path.startswith("/api") else r.json()["error"]["message"]
            assert message == "request body too large: the limit is 1 MiB"
        data = os.urandom(3 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert httpx.post(f"{handle.url}/api/blobs/{digest}", content=data, timeout=60).status_code == 201
        assert post(handle, "/api/generate", {"model": SCRIPTED, "prompt": "hi", "stream": False}).status_code == 200


def test_aliases_are_listed_by_both_apis(daemon):
    tags = {m["name"]: m["digest"] for m in httpx.get(daemon.url + "/api/tags").json()["models"]}
    assert tags["tiny:latest"] == tags["tiny:scripted"] and tags["smollm2:latest"] == tags["smollm2:135m"]
    assert "all-minilm:latest" in tags
    ids = [m["id"] for m in httpx.get(daemon.url + "/v1/models").json()["data"]]
    assert {"tiny:latest", "smollm2:latest", "all-minilm:latest"} <= set(ids)


@pytest.fixture(scope="module")
def family_daemon(tmp_path_factory, tiny_dirs):
    import families
    from conftest import make_settings, run_daemon

    root = tmp_path_factory.mktemp("family-daemon")
    dirs = {f: families.build(root / "models" / f, f) for f in families.FAMILIES + families.GENERIC + families.MOE}
    import json
    import shutil

    unknown = shutil.copytree(dirs["llama"], root / "models" / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel",
                                                     "architectures": ["NoSuchModelForCausalLM"]}))
    dirs["unknown"] = unknown
    dirs["gpt-oss-mxfp4"], _ = families.build_mxfp4(root / "models" / "gpt-oss-mxfp4")
    settings = make_settings(root, tiny_dirs)
    tags = "".join(f"  {f}:\n    source: {{path: '{d}'}}\n" for f, d in dirs.items())
    (settings.modelfiles_dir / "fam.yaml").write_text("family: fam\ntags:\n" + tags)
    yield from run_daemon(settings)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-mm", "phi3",
                                    "phi4-mini", "gpt2", "opt", "falcon", "mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss",
                                    "gpt-oss-mxfp4"])
def test_every_family_answers_chat_and_says_which_decoder_runs_it(family_daemon, family):
    r = post(family_daemon, "/api/chat", {"model": f"fam:{family}", "stream": False,
                                          "messages": [{"role": "user", "content": "Hello world"}],
                                          "options": {"num_predict": 12, "temperature": 0}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["done"] and body["eval_count"] == 12 and body["prompt_eval_count"] > 5
    show = post(family_daemon, "/api/show", {"model": f"fam:{family}"}).json()
    generic = family in ("gpt2", "opt", "falcon")
    assert show["details"]["engine"] == ("transformers" if generic else "hfollama")
    assert show["model_info"]["hfollama.decode_path"] == ("transformers" if generic else "reference")
    if family == "gpt-oss-mxfp4":  # as Ollama names gpt-oss's quantization
        assert show["details"]["quantization_level"] == "MXFP4"


def test_an_architecture_transformers_does_not_know_is_named(family_daemon, caplog):
    r = post(family_daemon, "/api/chat", {"model": "fam:unknown", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    assert r.json()["error"].startswith("architecture 'nosuchmodel' is not known to transformers")
    assert not [rec for rec in caplog.records if rec.exc_info]
    assert post(family_daemon, "/api/chat", {"model": "fam:llama", "stream": False,
                                             "messages": [{"role": "user", "content": "hi"}],
                                             "options": {"num_predict": 2}}).status_code == 200


def test_small_prompts_are_built_on_the_event_loop_large_ones_on_a_worker(daemon, monkeypatch):
    """A burst of small requests building on worker threads convoys on the GIL (the H200 bench:
    32 requests reached the runner only after 90 ms); a large prompt stays off the loop."""
    import threading

    from daemon.engine.prompt import PromptBuilder
    from daemon.server.handlers import inference

    threads, chat_ids = [], PromptBuilder.chat_ids
    monkeypatch.setattr(PromptBuilder, "chat_ids",
                        lambda self, *a, **k: (threads.append(threading.current_thread().name), chat_ids(self, *a, **k))[1])
    big = "word " * (inference.INLINE_BUILD_BYTES // 4)
    for content in ("hi", big):
        body = {"model": RANDOM, "messages": [{"role": "user", "content": content}], "stream": False,
                "options": {"num_predict": 1, "num_ctx": 1 << 15}}
        assert post(daemon, "/api/chat", body).status_code == 200
    loop_thread, worker = threads[-2], threads[-1]
    assert not loop_thread.startswith("asyncio_") and worker.startswith("asyncio_"), threads
