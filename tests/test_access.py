"""The access log: one line per request with its fields, never its prompt or headers."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from conftest import make_settings, run_daemon
from daemon.logs import JsonFormatter
from daemon.server.access import access_text

SECRET_PROMPT = "the-launch-code-is-swordfish"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_dirs):
    yield from run_daemon(make_settings(tmp_path_factory.mktemp("access"), tiny_dirs))


def access_records(caplog, wait: bool = True):
    """The access lines so far; the line is written after the last byte, which the client may
    have read first: wait a moment for it."""
    deadline = time.time() + (2 if wait else 0)
    while True:
        records = [r for r in caplog.records if r.name == "hfollama.access"]
        if records or time.time() >= deadline:
            return records
        time.sleep(0.01)


def test_a_generation_line_has_every_field_and_no_prompt(daemon, caplog):
    with caplog.at_level(logging.DEBUG):
        r = httpx.post(daemon.url + "/api/chat", timeout=120, headers={"X-Forwarded-For": "10.1.2.3"}, json={
            "model": "tiny:scripted", "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": True})
        final = json.loads(r.text.strip().splitlines()[-1])
        [record] = access_records(caplog)  # within the block: a line after it would be below its level
    fields = record.access
    assert fields["method"] == "POST" and fields["path"] == "/api/chat" and fields["route"] == "/api/chat"
    assert fields["status"] == 200 and fields["model"] == "tiny:scripted" and fields["client"] == "127.0.0.1"
    assert fields["forwarded_for"] == "10.1.2.3"
    assert fields["generated_tokens"] == final["eval_count"]
    assert fields["prompt_tokens"] - fields["cached_tokens"] == final["prompt_eval_count"]
    assert 0 < fields["ttft_ms"] <= fields["duration_ms"]
    line = JsonFormatter().format(record)
    assert json.loads(line)["model"] == "tiny:scripted"
    for text in (record.getMessage(), line):
        assert SECRET_PROMPT not in text
    assert all(SECRET_PROMPT not in r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)


@pytest.mark.parametrize("method,path,body,status,route", [
    ("GET", "/api/tags", None, 200, "/api/tags"),
    ("POST", "/api/show", {"model": "nope"}, 404, "/api/show"),
    ("POST", "/api/chat", b"{not json", 400, "/api/chat"),
    ("GET", "/no/such/route", None, 404, "unmatched"),
    ("POST", "/api/embed", {"model": "tiny:scripted", "input": ["a b c"]}, 200, "/api/embed"),
])
def test_every_request_gets_one_line(daemon, caplog, method, path, body, status, route):
    with caplog.at_level(logging.INFO):
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert httpx.request(method, daemon.url + path, timeout=120, **kwargs).status_code == status
        [record] = access_records(caplog)
    assert record.access["status"] == status and record.access["route"] == route
    if path == "/api/embed":
        assert record.access["model"] == "tiny:scripted" and record.access["prompt_tokens"] > 0
        assert "generated_tokens" not in record.access


def test_a_client_that_leaves_is_499(daemon, caplog):
    async def leave():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "tiny:random", "prompt": "go", "options": {"num_predict": 100000}}
            async with client.stream("POST", daemon.url + "/api/generate", json=body) as r:
                async for _ in r.aiter_lines():
                    break  # the first line, then away
    with caplog.at_level(logging.INFO):
        asyncio.run(leave())
        for _ in range(100):
            if access_records(caplog):
                break
            asyncio.run(asyncio.sleep(0.05))
        [record] = access_records(caplog)
    assert record.access["status"] == 499 and record.access["model"] == "tiny:random"


def test_text_form():
    fields = {"client": "127.0.0.1", "method": "POST", "path": "/api/chat", "route": "/api/chat", "status": 200,
              "model": "llama3:8b", "prompt_tokens": 12, "ttft_ms": 20.5, "duration_ms": 80.0}
    assert access_text(fields) == ('127.0.0.1 "POST /api/chat" 200 model=llama3:8b prompt_tokens=12 ttft_ms=20.5 '
                                   "duration_ms=80.0")


def test_scrapes_and_probes_are_quiet_unless_debugging_or_failing(daemon, caplog):
    with caplog.at_level(logging.INFO):
        for path in ("/", "/metrics", "/api/version"):
            httpx.get(daemon.url + path)
        time.sleep(0.2)
        assert access_records(caplog, wait=False) == []
    with caplog.at_level(logging.DEBUG):
        httpx.get(daemon.url + "/metrics")
        assert [r.access["route"] for r in access_records(caplog)] == ["/metrics"]
