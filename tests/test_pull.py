"""/api/pull with the real huggingface_hub client against a Hub-shaped local server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import ollama
import pytest

import hubserver
from conftest import make_settings, run_daemon
from tinymodels import SCRIPT_TEXT


@pytest.fixture(scope="module")
def hub(tiny_dirs):
    server = hubserver.HubServer(repos={
        "org/tiny": hubserver.Repo.from_folder(tiny_dirs["scripted"]),
        "org/random": hubserver.Repo.from_folder(tiny_dirs["random"]),
        "org/slow": hubserver.Repo.from_folder(tiny_dirs["random"], license="mit"),
        "org/shared": hubserver.Repo.from_folder(tiny_dirs["random"]),
        "org/broken": hubserver.Repo.from_folder(tiny_dirs["random"]),
        "meta/gated": hubserver.Repo.from_folder(tiny_dirs["scripted"], gated=True, token="good-token"),
        # a mirror that names files and commits outside the store
        "evil/paths": hubserver.Repo({**hubserver.Repo.from_folder(tiny_dirs["random"]).files,
                                      "../../../../escaped.safetensors": b"x" * 20_000}),
        "evil/commit": hubserver.Repo.from_folder(tiny_dirs["random"], commit="../../../../escaped"),
    })
    yield from hubserver.start(server)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_dirs, hub):
    root = tmp_path_factory.mktemp("pull")
    settings = make_settings(root, tiny_dirs, hf_endpoint=hub.url)
    (settings.modelfiles_dir / "mine.yaml").write_text(
        "tags:\n"
        "  latest:\n"
        "    source: {repo: org/tiny, revision: main}\n"
        "    system: You are mine.\n"
        "    parameters: {stop: [STOP], temperature: 0}\n"
        "  gone: {source: {repo: org/missing}}\n"
        "  oldrev: {source: {repo: org/tiny, revision: v9}}\n")
    (settings.modelfiles_dir / "climbing.yaml").write_text(
        "tags:\n  latest: {source: {repo: org/tiny, revision: ../../../../escaped}}\n")
    yield from run_daemon(settings)


@pytest.fixture()
def client(daemon):
    return ollama.Client(host=daemon.url)


@pytest.mark.parametrize("paths,chosen", [
    (["config.json", "model.safetensors", "original/consolidated.00.pth", "pytorch_model.bin", "README.md",
      "tokenizer.json", "onnx/model.onnx", "generation_config.json"],
     ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]),
    (["config.json", "pytorch_model.bin", "tokenizer.json"], ["config.json", "pytorch_model.bin", "tokenizer.json"]),
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "1_Pooling/config.json", "modules.json"],
     ["1_Pooling/config.json", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "modules.json"]),
])
def test_only_the_files_a_model_needs(paths, chosen):
    from daemon.store.pull import select_files
    assert select_files(paths) == chosen


@pytest.mark.parametrize("tag,chosen", [("latest", "m-Q4_K_M.gguf"), ("q8_0", "m-Q8_0.gguf"), ("Q4_0", "m-Q4_0.gguf"),
                                        ("q4_k", None), ("f16", "m-F16.gguf")])
def test_gguf_chosen_by_quantization_tag(tag, chosen):
    from daemon.store.pull import choose_gguf
    assert choose_gguf(["m-Q4_0.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-F16.gguf", "README.md"], tag) == chosen


def test_exact_progress_sequence_then_generate(client, hub):
    events = [e.model_dump(exclude_none=True) for e in client.pull("hf.co/org/tiny", stream=True)]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    files = [e for e in events if e["status"].startswith("pulling ") and e["status"] != "pulling manifest"]
    assert files and all(e["digest"].startswith("sha256:") and len(e["digest"]) == 71 for e in files)
    assert all(e["status"] == f"pulling {e['digest'][7:19]}" for e in files)
    weights = hub.repos["org/tiny"].files["model.safetensors"]
    finals = {e["digest"]: e for e in files if e.get("completed") == e["total"]}
    assert any(e["total"] == len(weights) for e in finals.values())
    downloaded = {e["total"] for e in finals.values()}
    assert downloaded == {len(d) for p, d in hub.repos["org/tiny"].files.items() if p != "SCRIPT.json"}
    r = client.generate(model="hf.co/org/tiny", prompt="hi", options={"temperature": 0})
    assert r.response == SCRIPT_TEXT
    tags = {m.model: m for m in client.list().models}
    assert "hf.co/org/tiny:latest" in tags and tags["hf.co/org/tiny:latest"].details.format == "safetensors"
    assert client.show("hf.co/org/tiny").license == "apache-2.0"


def test_stream_false_returns_the_last_object(client):
    assert client.pull("hf.co/org/random", stream=False).status == "success"


def test_pull_through_a_modelfile_keeps_its_settings(client, daemon):
    assert client.pull("mine").status == "success"
    info = httpx.post(daemon.url + "/api/show", json={"model": "mine"}).json()
    assert info["system"] == "You are mine." and '"STOP"' in info["parameters"]
    assert client.generate(model="mine", prompt="hi").response == "Hello world "
    assert (daemon.settings.models_dir / "hub" / "models--org--tiny" / "snapshots").is_dir()


@pytest.mark.parametrize("name,message", [
    ("nothing-like-this", "pull model manifest: file does not exist"),
    ("hf.co/org/nope", "pull model manifest: file does not exist"),
    ("mine:gone", "pull model manifest: file does not exist"),
    ("mine:oldrev", "has no revision 'v9'"),
])
def test_missing_models_and_revisions(daemon, name, message):
    with httpx.stream("POST", daemon.url + "/api/pull", json={"model": name}, timeout=30) as r:
        lines = [json.loads(x) for x in r.iter_lines()]
    assert r.status_code == 200 and lines[0] == {"status": "pulling manifest"}
    assert message in lines[-1]["error"] and len(lines) == 2
    r = httpx.post(daemon.url + "/api/pull", json={"model": name, "stream": False}, timeout=30)
    assert r.status_code == 500 and message in r.json()["error"]


def test_gated_repo_says_what_to_do(daemon):
    r = httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/meta/gated", "stream": False}, timeout=30)
    assert r.status_code == 500
    error = r.json()["error"]
    assert "gated" in error and "HF_TOKEN" in error and "huggingface.co/meta/gated" in error
    assert "hf.co/meta/gated:latest" not in [m["name"] for m in httpx.get(daemon.url + "/api/tags").json()["models"]]


def test_gated_repo_with_a_token(tmp_path, tiny_dirs, hub):
    for handle in run_daemon(make_settings(tmp_path / "good", tiny_dirs, hf_endpoint=hub.url, hf_token="good-token")):
        assert ollama.Client(host=handle.url).pull("hf.co/meta/gated").status == "success"
    hub.log.clear()
    for handle in run_daemon(make_settings(tmp_path / "bad", tiny_dirs, hf_endpoint=hub.url, hf_token="no-access")):
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=handle.url).pull("hf.co/meta/gated")
        assert "gated" in err.value.error and "HF_TOKEN" in err.value.error
    assert hub.log == []  # refused with 403 before any byte of the repo was served


def test_invalid_names(daemon):
    for body in ({"model": ""}, {"model": "bad name!"}, {}):
        r = httpx.post(daemon.url + "/api/pull", json=body)
        assert r.status_code == 400 and r.json() == {"error": "invalid model name"}


def test_legacy_name_key(daemon):
    r = httpx.post(daemon.url + "/api/pull", json={"name": "hf.co/org/random", "stream": False}, timeout=60)
    assert r.json() == {"status": "success"}


def test_sha256_mismatch_is_rejected_and_nothing_is_kept(daemon, hub):
    hub.corrupt.add("model.safetensors")
    try:
        r = httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/org/broken", "stream": False}, timeout=60)
    finally:
        hub.corrupt.discard("model.safetensors")
    assert r.status_code == 500 and "digest mismatch" in r.json()["error"]
    repo_dir = daemon.settings.models_dir / "hub" / "models--org--broken" / "blobs"
    sha = __import__("hashlib").sha256(hub.repos["org/broken"].files["model.safetensors"]).hexdigest()
    assert not (repo_dir / sha).exists() and not (repo_dir / f"{sha}.incomplete").exists()
    assert not (daemon.settings.models_dir / "manifests" / "hf.co" / "org" / "broken").exists()


def test_interrupted_pull_resumes_where_it_stopped(daemon, hub):
    weights = hub.repos["org/slow"].files["model.safetensors"]
    hub.throttle["model.safetensors"] = len(weights) / 3  # about three seconds
    hub.log.clear()
    try:
        with httpx.stream("POST", daemon.url + "/api/pull", json={"model": "hf.co/org/slow"}, timeout=30) as r:
            for line in r.iter_lines():
                event = json.loads(line)
                if event.get("total") == len(weights) and event.get("completed", 0) > len(weights) // 4:
                    break  # the client goes away halfway: the daemon stops the transfer
        time.sleep(0.5)
        first = hub.bytes_sent("model.safetensors")
        assert 0 < first < len(weights)
        hub.throttle.clear()
        r = httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/org/slow", "stream": False}, timeout=60)
        assert r.json() == {"status": "success"}
    finally:
        hub.throttle.clear()
    ranges = [rng for m, p, rng, _ in hub.log if p == "model.safetensors" and m == "GET"]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes=")
    total = hub.bytes_sent("model.safetensors")
    assert len(weights) <= total <= len(weights) + 64 * 1024  # what was on disk was not fetched again


def test_two_concurrent_pulls_share_one_download(daemon, hub):
    weights = hub.repos["org/shared"].files["model.safetensors"]
    hub.throttle["model.safetensors"] = len(weights) / 1.5
    hub.log.clear()
    results = []

    def pull():
        results.append(httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/org/shared", "stream": False},
                                  timeout=60).json())

    try:
        threads = [threading.Thread(target=pull) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hub.throttle.clear()
    assert results == [{"status": "success"}] * 2
    assert hub.bytes_sent("model.safetensors") == len(weights)


@pytest.mark.parametrize("name,message", [
    ("hf.co/evil/paths", "refusing file path '../../../../escaped.safetensors'"),
    ("hf.co/evil/commit", "refusing commit '../../../../escaped'"),
])
def test_names_from_the_hub_that_leave_the_store_are_refused_before_any_file_is_written(daemon, hub, name, message):
    root = daemon.settings.models_dir
    before = {p for p in root.parent.rglob("*")}
    hub.log.clear()
    r = httpx.post(daemon.url + "/api/pull", json={"model": name, "stream": False}, timeout=60)
    assert r.status_code == 500 and message in r.json()["error"]
    assert hub.log == [] or all("/resolve/" not in path for _, path, _, _ in hub.log)  # nothing downloaded
    assert {p for p in root.parent.rglob("*")} == before  # nothing written, inside the store or out
    assert not list(root.parent.parent.rglob("escaped*"))


def test_a_modelfile_revision_that_climbs_is_refused(daemon):
    """`revision: ../../x` in a modelfile: the tag is refused when the modelfile is read (and
    the log says why), so it can neither pull nor write a ref."""
    registry = daemon.services.catalog.registry
    registry.all()
    assert any("refusing revision" in str(e) for e in registry.errors)
    r = httpx.post(daemon.url + "/api/pull", json={"model": "climbing", "stream": False}, timeout=30)
    assert r.status_code == 500 and "file does not exist" in r.json()["error"]
    assert not list(daemon.settings.models_dir.parent.parent.rglob("escaped*"))


def test_an_unreachable_hub_is_named_without_a_traceback(tmp_path, tiny_dirs, caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for handle in run_daemon(make_settings(tmp_path, tiny_dirs, hf_endpoint=f"http://127.0.0.1:{port}")):
        r = httpx.post(handle.url + "/api/pull", json={"model": "hf.co/org/tiny", "stream": False}, timeout=60)
        assert r.status_code == 500
        error = r.json()["error"]
        assert f"could not reach the Hub at http://127.0.0.1:{port}" in error and "refused" in error.lower()
        assert "Traceback" not in error
    assert not [rec for rec in caplog.records if rec.exc_info]  # not logged as a crash either
