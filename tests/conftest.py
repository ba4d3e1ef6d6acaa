"""Shared fixtures: tiny models on disk, and a live daemon on 127.0.0.1 in a thread."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import torch  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if not torch.cuda.is_available():
    # Without a GPU, Triton (where installed) runs kernels in its interpreter (tests/*_interpreted.py).
    # It has to be set before anything imports triton (bitsandbytes and transformers may).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from daemon.config import Settings, parse_host  # noqa: E402
from tinymodels import (HARMONY, HARMONY_SCRIPT, HARMONY_TOOL_SCRIPT, HERMES_TOOLS, THINKING, THINKING_SCRIPT,  # noqa: E402
                        TOOL_SCRIPT, build_model)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "scripted": build_model(root / "scripted", scripted=True),
        "random": build_model(root / "random", scripted=False, seed=1),
        # tool calling and thinking: scripted answers, and random weights steered by grammars
        "tools": build_model(root / "tools", scripted=True, script=TOOL_SCRIPT, template=HERMES_TOOLS),
        "tools-random": build_model(root / "tools-random", scripted=False, seed=2, script=TOOL_SCRIPT,
                                    template=HERMES_TOOLS),
        "thinker": build_model(root / "thinker", scripted=True, script=THINKING_SCRIPT, template=THINKING),
        "harmony": build_model(root / "harmony", scripted=True, script=HARMONY_SCRIPT, template=HARMONY),
        "harmony-tools": build_model(root / "harmony-tools", scripted=True, script=HARMONY_TOOL_SCRIPT,
                                     template=HARMONY),
    }


def write_tiny_modelfiles(folder: Path, tiny_dirs: dict[str, Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tags = "".join(f"  {tag}:\n    source: {{path: '{path}'}}\n" for tag, path in tiny_dirs.items())
    (folder / "tiny.yaml").write_text("family: tiny\ntags:\n" + tags + "  latest: {alias: scripted}\n")


@dataclass
class DaemonHandle:
    url: str
    port: int
    settings: Settings
    loop: asyncio.AbstractEventLoop
    app: object

    @property
    def services(self):
        from daemon.server.state import SERVICES

        return self.app[SERVICES]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro):  # run a coroutine on the daemon's loop, from a test
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)


def run_daemon(settings: Settings) -> Iterator[DaemonHandle]:
    from daemon.server.app import create_app, start_server

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        app = create_app(settings)
        runner, port = await start_server(app, "127.0.0.1", 0)
        state["port"], state["stop"], state["app"] = port, asyncio.Event(), app
        ready.set()
        await state["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(60), "daemon did not start"
    port = state["port"]
    try:
        yield DaemonHandle(f"http://127.0.0.1:{port}", port, settings, loop, state["app"])
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(60)


def make_settings(root: Path, tiny_dirs: dict[str, Path], **overrides) -> Settings:
    modelfiles = root / "modelfiles"
    write_tiny_modelfiles(modelfiles, tiny_dirs)
    base = dict(bind=parse_host("127.0.0.1:0"), models_dir=root / "models", user_modelfiles_dir=modelfiles,
                context_length=2048, num_parallel=4, device="cpu")
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Iterator[DaemonHandle]:
    """One daemon for the whole session: models load once (SmolLM2's GGUF converts once)."""
    settings = make_settings(tmp_path_factory.mktemp("daemon"), tiny_dirs)
    yield from run_daemon(settings)
