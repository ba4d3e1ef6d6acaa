"""The package as users install it: a wheel, installed non-editable, serves what a checkout serves."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "daemon").rglob("__init__.py")}
    assert listed == found | {"daemon.modelfiles"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_serves_the_embedded_model(tmp_path, daemon):
    # the session daemon converts SmolLM2's GGUF once; the fresh install gets a copy of that
    # store's converted folder instead of a minute of converting again
    assert httpx.post(daemon.url + "/api/generate", json={"model": "smollm2:135m"}, timeout=600).status_code == 200
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next(wheels.glob("hfollama-*.whl"))
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, transformers, the embedded models' packages) from this venv, by
    # path: its editable hfollama is a .pth hook there, which a path entry does not run
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.run([python, "-c", "import daemon; print(daemon.__file__)"], check=True, cwd=tmp_path,
                           capture_output=True, text=True).stdout
    assert where.startswith(str(purelib))  # the installed copy, not this checkout

    store = tmp_path / "store"
    shutil.copytree(daemon.settings.models_dir / "derived", store / "derived",
                    ignore=shutil.ignore_patterns(".*.lock", ".*.tmp-*"))
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(store), "HOME": str(tmp_path),
           "HFOLLAMA_DEVICE": "cpu"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([venv / "bin" / "hfollama", "serve"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=1).text == "Ollama is running":
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("the installed daemon did not come up: " + (proc.stdout.read() if proc.poll() else ""))
        names = [m["name"] for m in httpx.get(url + "/api/tags", timeout=30).json()["models"]]
        assert {"smollm2:135m", "smollm2:latest", "all-minilm:latest"} <= set(names)
        for page in ("/ui", "/ui/app.js", "/ui/markdown.js", "/ui/style.css"):  # the chat page is package data
            assert httpx.get(url + page, timeout=30).status_code == 200, page
        r = httpx.post(url + "/api/generate", timeout=300, json={
            "model": "smollm2:135m", "prompt": "What is the capital of France?", "stream": False,
            "options": {"temperature": 0, "num_predict": 24}})
        assert r.status_code == 200 and "Paris" in r.json()["response"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
