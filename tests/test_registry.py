import os
import time
from pathlib import Path

import pytest

from daemon.names import ModelName
from daemon.registry.registry import Registry


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / name
    f.write_text(text)
    return f


def test_user_files_override_and_extend(tmp_path):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    write(shipped, "fam.yaml", "tags:\n  a: {source: {repo: org/a}}\n  b: {source: {repo: org/b}}\n")
    write(user, "fam.yaml", "tags:\n  a: {source: {repo: org/mine}}\n  c: {source: {repo: org/c}}\n")
    reg = Registry([shipped, user])
    assert reg.find(ModelName.parse("fam:a")).source.repo == "org/mine"
    assert reg.find(ModelName.parse("FAM:B")).source.repo == "org/b"
    assert reg.find(ModelName.parse("fam:c")).source.repo == "org/c"
    assert reg.find(ModelName.parse("fam:d")) is None
    assert reg.find(ModelName.parse("ns/fam:a")) is None  # modelfiles name the default namespace only


def test_broken_file_is_reported_and_others_serve(tmp_path):
    write(tmp_path, "good.yaml", "tags:\n  x: {source: {repo: org/x}}\n")
    write(tmp_path, "bad.yaml", "tags:\n  x: {source: {repo: nope}}\n")
    reg = Registry([tmp_path])
    assert reg.find(ModelName.parse("good:x")) is not None
    assert len(reg.errors) == 1 and reg.errors[0].key == "tags.x.source.repo"


def test_edits_take_effect_without_restart(tmp_path):
    f = write(tmp_path, "fam.yaml", "tags:\n  a: {source: {repo: org/one}}\n")
    reg = Registry([tmp_path])
    assert reg.find(ModelName.parse("fam:a")).source.repo == "org/one"
    f.write_text("tags:\n  a: {source: {repo: org/two}}\n")
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert reg.find(ModelName.parse("fam:a")).source.repo == "org/two"


@pytest.mark.parametrize("name,repo,quantization", [
    ("qwen3", "Qwen/Qwen3-8B", "nf4"), ("qwen3:0.6b", "Qwen/Qwen3-0.6B", "none"), ("qwen3:32b", "Qwen/Qwen3-32B", "nf4"),
    ("gemma3", "google/gemma-3-4b-it", "nf4"), ("gemma3:1b", "google/gemma-3-1b-it", "none"),
    ("gemma3:27b", "google/gemma-3-27b-it", "nf4"), ("gemma2", "google/gemma-2-9b-it", "nf4"),
    ("phi4", "microsoft/phi-4", "nf4"), ("phi3:medium", "microsoft/Phi-3-medium-4k-instruct", "nf4"),
    ("mistral", "mistralai/Mistral-7B-Instruct-v0.3", "nf4"), ("mistral-nemo", "mistralai/Mistral-Nemo-Instruct-2407", "nf4"),
    ("mistral-small", "mistralai/Mistral-Small-24B-Instruct-2501", "nf4"),
    ("deepseek-r1", "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "nf4"),
    ("deepseek-r1:14b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "nf4"),
    ("qwen2.5", "Qwen/Qwen2.5-7B-Instruct", "nf4"), ("qwen2.5-coder:1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "none"),
])
def test_the_families_people_pull_have_ollamas_names(name, repo, quantization):
    """Ollama's names for the families people pull most, on the official Hub repositories, with
    each family's stop tokens (and tool parser, FIM tokens) where it has them."""
    from daemon.names import ModelName
    from daemon.registry.registry import Registry, shipped_modelfiles_dir

    registry = Registry([shipped_modelfiles_dir()])
    assert registry.errors == []
    m = registry.find(ModelName.parse(name))
    assert m is not None and m.source.repo == repo and m.quantization.mode == quantization
    assert m.parameters.get("stop")
    family = name.split(":")[0]
    if family in ("qwen3", "qwen2.5", "qwen2.5-coder"):
        assert m.tool_parser == "hermes"
    if family.startswith("mistral"):
        assert m.tool_parser == "mistral"
    if family == "qwen2.5-coder":
        assert m.fim is not None and m.fim.prefix == "<|fim_prefix|>"
