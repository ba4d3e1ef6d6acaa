import os
import time
from pathlib import Path

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
