"""`hfollama serve` as users start it: a real process, its flags and environment."""

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
