import httpx

from daemon import OLLAMA_API_VERSION


def test_root_and_version(daemon):
    r = httpx.get(daemon.url + "/")
    assert r.status_code == 200 and r.text == "Ollama is running" and r.headers["content-type"].startswith("text/plain")
    assert httpx.head(daemon.url + "/").status_code == 200
    v = httpx.get(daemon.url + "/api/version").json()["version"]
    assert v == OLLAMA_API_VERSION and all(part.isdigit() for part in v.split("."))
    assert httpx.head(daemon.url + "/api/version").status_code == 200
    assert httpx.get(daemon.url + "/api/status").json() == {"cloud": {"disabled": True, "source": "none"}}


def test_trailing_slash_redirects(daemon):
    r = httpx.get(daemon.url + "/api/version/", follow_redirects=True)
    assert r.status_code == 200 and r.json()["version"] == OLLAMA_API_VERSION
