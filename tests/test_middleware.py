"""CORS and Host checks on a daemon bound to loopback (no models are loaded)."""

import httpx
import pytest

from conftest import make_settings, run_daemon


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_dirs):
    settings = make_settings(tmp_path_factory.mktemp("cors"), tiny_dirs, origins=("chrome-extension://*",))
    yield from run_daemon(settings)


@pytest.mark.parametrize("origin,allowed", [
    ("http://localhost", True), ("http://localhost:3000", True), ("https://127.0.0.1:8080", True),
    ("app://obsidian.md", True), ("vscode-webview://abc", True), ("chrome-extension://abcdef", True),
    ("https://evil.example", False), ("http://localhost.evil.example", False),
])
def test_origins(guarded, origin, allowed):
    r = httpx.get(guarded.url + "/api/version", headers={"Origin": origin})
    if allowed:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    else:
        assert r.status_code == 403 and r.content == b""


def test_no_origin_always_passes(guarded):
    assert httpx.get(guarded.url + "/api/version").status_code == 200


def test_preflight(guarded):
    r = httpx.options(guarded.url + "/api/chat", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-stainless-os"})
    assert r.status_code == 204
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-stainless-os" in r.headers["access-control-allow-headers"]


def test_wildcard_origins(tmp_path, tiny_dirs):
    for handle in run_daemon(make_settings(tmp_path, tiny_dirs, origins=("*",))):
        r = httpx.get(handle.url + "/", headers={"Origin": "https://anything.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("host,allowed", [
    ("localhost:11434", True), ("127.0.0.1:11434", True), ("[::1]:11434", True), ("192.168.1.5", True),
    ("box.local", True), ("svc.internal", True), ("app.localhost", True),
    ("evil.example.com", False), ("8.8.8.8:11434", False),
])
def test_host_header_guard_while_bound_to_loopback(guarded, host, allowed):
    r = httpx.get(guarded.url + "/", headers={"Host": host})
    assert (r.status_code == 200) is allowed
    if not allowed:
        assert r.status_code == 403 and r.content == b""


@pytest.mark.parametrize("host,origin,same", [
    ("192.168.1.5:11434", "http://192.168.1.5:11434", True), ("[fd00::5]:11434", "http://[fd00::5]:11434", True),
    ("192.168.1.5:11434", "https://192.168.1.5:11434", True), ("192.168.1.5:11434", "http://192.168.1.5:8080", False),
    ("myhost.lan:11434", "http://myhost.lan:11434", False),  # a name could be rebound: the allow-list decides
    ("", "http://192.168.1.5:11434", False),
])
def test_a_page_opened_at_an_address_is_its_own_origin(host, origin, same):
    from daemon.server.middleware import same_origin_by_address

    class Request:
        headers = {"Host": host}
    assert same_origin_by_address(Request(), origin) is same


def test_the_chat_page_posts_from_its_own_address(guarded):
    r = httpx.get(guarded.url + "/api/version", headers={"Origin": "http://10.0.0.7:11434", "Host": "10.0.0.7:11434"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://10.0.0.7:11434"
