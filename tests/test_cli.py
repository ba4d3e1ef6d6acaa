"""`hfollama serve` as users start it: a real process, its flags and environment."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from daemon.cli import build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "m"),
           "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).text == "Ollama is running":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("daemon did not come up: " + (proc.stdout.read() if proc.poll() is not None else ""))
        names = [m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/api/tags").json()["models"]]
        assert "smollm2:135m" in names
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "daemon", "serve", "--host", f"127.0.0.1:{port}",
                               "--models", str(tmp_path)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 1 and "address already in use" in proc.stderr.lower()


def test_flags():
    args = build_parser().parse_args(["serve", "--host", ":8080", "--context-length", "8192", "--parallel", "2"])
    assert (args.host, args.context_length, args.parallel) == (":8080", 8192, 2)


def start(tmp_path, *flags, env_extra=None):
    port = free_port()
    env = {**os.environ, "OLLAMA_MODELS": str(tmp_path / "m"), "HOME": str(tmp_path), **(env_extra or {})}
    env.pop("HFOLLAMA_API_KEYS", None)
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--host", f"0.0.0.0:{port}", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("daemon did not come up: " + proc.stdout.read())


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    return proc.stdout.read()


def test_api_key_file_and_json_logs(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nsk-one\n\nsk-two\n")
    proc, url = start(tmp_path, "--api-key-file", str(keys), "--log-format", "json")
    try:
        assert httpx.get(url + "/api/tags").status_code == 401
        assert httpx.get(url + "/api/tags", headers={"Authorization": "Bearer sk-two"}).status_code == 200
        assert httpx.get(url + "/api/tags", headers={"Authorization": "Bearer # the team's keys"}).status_code == 401
    finally:
        out = stop(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "hfollama.access"]
    assert [a["status"] for a in access if a["path"] == "/api/tags"] == [401, 200, 401]
    assert "sk-two" not in out and "no API keys" not in out


def test_an_open_public_bind_warns_at_start_and_the_chat_page_is_announced(tmp_path):
    proc, url = start(tmp_path)
    out = stop(proc)
    assert "no API keys" in out
    assert f"Chat page: {url}/ui" in out  # the address to open, printed at start


def test_a_key_file_without_keys_refuses_to_start(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    for flags in (["--api-key-file", str(empty)], ["--api-key-file", str(tmp_path / "missing")]):
        done = subprocess.run([sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1:0", *flags],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
        assert done.returncode == 1 and "API key file" in done.stderr and "Traceback" not in done.stderr


def test_run_attaches_image_paths_in_the_prompt(tmp_path):
    """`run` takes image files named in the prompt (plain, quoted, with escaped spaces), as
    `ollama run` does: read, attached as base64, their paths out of the text; other words stay."""
    import base64
    import io

    from daemon.cli import user_message

    (tmp_path / "a.png").write_bytes(b"first")
    (tmp_path / "my pic.JPG").write_bytes(b"second")
    err = io.StringIO()
    message = user_message(f"compare {tmp_path}/a.png with '{tmp_path}/my pic.JPG' and gone.png", err)
    assert message["content"] == "compare with and gone.png"
    assert [base64.b64decode(i) for i in message["images"]] == [b"first", b"second"]
    assert "Added image" in err.getvalue()
    escaped = user_message(str(tmp_path / "my pic.JPG").replace(" ", "\\ ") + " what?", io.StringIO())
    assert escaped["content"] == "what?" and len(escaped["images"]) == 1
    assert user_message("no pictures here") == {"role": "user", "content": "no pictures here"}
