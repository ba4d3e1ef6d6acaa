"""API keys: every route but GET/HEAD / (and the chat page's static files) needs one, through every client; wrong and missing
keys fail alike and in the same time."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from conftest import make_settings, run_daemon
from daemon.client import Client, ClientError
from daemon.config import parse_host
from daemon.server import auth
from daemon.server.auth import KeyCheck, presented_key, warn_if_open

KEYS = ("sk-team-alpha-0123456789", "sk-team-beta-9876543210")
KEY = KEYS[1]
ROOT = Path(__file__).resolve().parents[1]
OLLAMA_JS = ROOT / "postman" / "node_modules" / "ollama"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_dirs):
    settings = make_settings(tmp_path_factory.mktemp("keyed"), tiny_dirs, api_keys=KEYS)
    yield from run_daemon(settings)


@pytest.fixture(scope="module")
def open_metrics(tmp_path_factory, tiny_dirs):
    settings = make_settings(tmp_path_factory.mktemp("keyed-open-metrics"), tiny_dirs, api_keys=KEYS,
                             metrics_auth=False)
    yield from run_daemon(settings)


# ---- the check ---------------------------------------------------------------------------

@pytest.mark.parametrize("presented,allowed", [
    (KEYS[0], True), (KEYS[1], True), ("sk-team-alpha-012345678", False), (KEYS[0] + "x", False),
    ("", False), (None, False), (KEYS[0].upper(), False),
])
def test_key_check(presented, allowed):
    assert KeyCheck(KEYS).allows(presented) is allowed


def test_no_keys_means_open_and_a_check_never_passes_an_empty_key():
    assert not KeyCheck(()).enabled and KeyCheck(KEYS).enabled
    assert not KeyCheck(()).allows("") and not KeyCheck(()).allows(None)


def test_every_key_is_compared_whatever_is_presented(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)
    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    check = KeyCheck(KEYS + ("third",))
    for presented in (KEYS[0], KEYS[1], "wrong", None):
        calls.clear()
        check.allows(presented)
        assert len(calls) == 3, presented  # no early exit on a match, and a missing key costs the same


@pytest.mark.parametrize("headers,key", [
    ({"Authorization": "Bearer abc"}, "abc"), ({"Authorization": "bearer  abc "}, "abc"),
    ({"x-api-key": "abc"}, "abc"), ({"Authorization": "Basic YWJj"}, None), ({"Authorization": "Bearer "}, None),
    ({}, None),
])
def test_presented_key(headers, key):
    class Request:
        pass
    request = Request()
    request.headers = headers
    assert presented_key(request) == key


# ---- over HTTP ---------------------------------------------------------------------------

def every_route(app) -> list[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{digest}", "sha256:" + "0" * 64).replace("{model}", "tiny:scripted")
        if route.method in ("GET", "POST", "DELETE", "HEAD", "PUT") and "{" not in path:
            routes.add((route.method, path))
    return sorted(routes)


def test_every_route_but_the_root_needs_a_key(keyed):
    routes = every_route(keyed.app)
    assert len(routes) > 20 and ("POST", "/api/chat") in routes and ("GET", "/metrics") in routes
    for method, path in routes:
        if path in ("/", "/ui") and method in ("GET", "HEAD"):  # the liveness probe, the chat page's files
            assert httpx.request(method, keyed.url + path).status_code == 200
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.request(method, keyed.url + path, headers=headers, json={} if method != "GET" else None)
            assert r.status_code == 401, (method, path, headers)
            assert r.headers["www-authenticate"].startswith("Bearer")
            if method == "HEAD":
                continue
            if path.startswith("/v1/"):
                error = r.json()["error"]
                assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
                assert "API key" in error["message"]
            else:
                assert r.json() == {"error": "unauthorized"}


def test_with_a_key_it_works_bearer_or_x_api_key(keyed):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEYS[0]}):
        r = httpx.post(keyed.url + "/api/generate", headers=headers,
                       json={"model": "tiny:scripted", "prompt": "hi", "stream": False})
        assert r.status_code == 200 and r.json()["done"]
        assert httpx.get(keyed.url + "/metrics", headers=headers).status_code == 200


def test_preflight_needs_no_key(keyed):
    r = httpx.options(keyed.url + "/api/chat", headers={"Origin": "http://localhost:3000",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 204 and "Authorization" in r.headers["access-control-allow-headers"]


def test_401_carries_cors_headers_for_browsers(keyed):
    r = httpx.get(keyed.url + "/api/tags", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_metrics_can_be_left_open(open_metrics):
    assert httpx.get(open_metrics.url + "/metrics").status_code == 200
    assert httpx.get(open_metrics.url + "/api/tags").status_code == 401


def test_ollama_python_client(keyed, monkeypatch):
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=keyed.url).list()
    assert err.value.status_code == 401 and "unauthorized" in str(err.value)
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=keyed.url, headers={"Authorization": "Bearer nope"}).list()
    models = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"}).list()
    assert any(m.model == "tiny:scripted" for m in models.models)
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)  # what `ollama` reads when given no header
    answer = ollama.Client(host=keyed.url).chat(model="tiny:scripted", messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content


def test_openai_client(keyed):
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert any(m.id == "tiny:scripted" for m in good.models.list())
    reply = good.chat.completions.create(model="tiny:scripted", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


@pytest.mark.skipif(shutil.which("node") is None or not OLLAMA_JS.is_dir(),
                    reason="ollama-js needs Node.js and `npm ci --prefix postman` (make test does it)")
def test_ollama_js_client(keyed, tmp_path):
    script = tmp_path / "client.mjs"
    script.write_text(f"""
import {{ Ollama }} from {json.dumps(str(OLLAMA_JS / "dist" / "index.mjs"))};
const out = {{}};
try {{ await new Ollama({{ host: process.env.URL }}).list(); out.without = "ok"; }}
catch (e) {{ out.without = e.status_code ?? e.message; }}
const keyed = new Ollama({{ host: process.env.URL, headers: {{ Authorization: "Bearer " + process.env.KEY }} }});
out.models = (await keyed.list()).models.map(m => m.name);
// (ollama-js sends OLLAMA_API_KEY to ollama.com only: elsewhere the header is given)
out.chat = (await keyed.chat({{ model: "tiny:scripted", messages: [{{ role: "user", content: "hi" }}] }})).message.content;
console.log(JSON.stringify(out));
""")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "URL": keyed.url, "KEY": KEY}
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["without"] == 401 and "tiny:scripted" in out["models"] and out["chat"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl(keyed):
    def curl(*extra: str) -> tuple[int, str]:
        done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *extra, keyed.url + "/api/tags"],
                              capture_output=True, text=True, timeout=60)
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body
    assert curl() == (401, '{"error":"unauthorized"}')
    status, body = curl("-H", f"Authorization: Bearer {KEY}")
    assert status == 200 and "tiny:scripted" in body


def test_the_cli_client_sends_the_key(keyed):
    with pytest.raises(ClientError) as err:
        Client(keyed.url).request("GET", "/api/tags")
    assert err.value.status == 401
    assert "models" in Client(keyed.url, KEY).request("GET", "/api/tags")


def test_a_wrong_key_fails_as_fast_as_a_missing_one(keyed):
    def timed(headers: dict) -> float:
        t = time.perf_counter()
        assert client.get("/api/version", headers=headers).status_code == 401
        return time.perf_counter() - t
    with httpx.Client(base_url=keyed.url) as client:
        for _ in range(20):
            timed({})
        missing, wrong, almost = [], [], []
        for _ in range(300):  # interleaved, so that drift in the machine's speed hits all alike
            missing.append(timed({}))
            wrong.append(timed({"Authorization": "Bearer wrong"}))
            almost.append(timed({"Authorization": f"Bearer {KEY[:-1]}X"}))
    m, w, a = (statistics.median(x) for x in (missing, wrong, almost))
    assert abs(w - m) < 0.25 * m and abs(a - m) < 0.25 * m, (m, w, a)


def test_keys_are_never_logged(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        httpx.get(keyed.url + "/api/tags", headers={"Authorization": f"Bearer {KEY}"})
        httpx.get(keyed.url + "/api/tags", headers={"Authorization": "Bearer sk-wrong-secret"})
    text = "\n".join(r.getMessage() + repr(getattr(r, "access", "")) for r in caplog.records)
    assert "hfollama.access" in {r.name for r in caplog.records}
    assert KEY not in text and "sk-wrong-secret" not in text
    assert KEY not in repr(keyed.settings)


@pytest.mark.parametrize("host,keys,warned", [
    ("0.0.0.0:11434", (), True), ("192.168.1.5:11434", (), True), ("0.0.0.0:11434", KEYS, False),
    ("127.0.0.1:11434", (), False), ("localhost:11434", (), False),
])
def test_an_open_public_bind_is_warned_about(caplog, host, keys, warned):
    with caplog.at_level(logging.WARNING, logger="daemon.server.auth"):
        warn_if_open(parse_host(host), KeyCheck(keys))
    assert any("no API keys" in r.getMessage() for r in caplog.records) is warned
