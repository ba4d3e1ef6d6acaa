import pytest

from daemon.store.derived import DerivedCache


def test_builds_once(tmp_path):
    cache = DerivedCache(tmp_path)
    calls = []

    def build(out):
        calls.append(out)
        out.mkdir()
        (out / "f").write_text("x")

    first = cache.get_or_build("k", build)
    assert (first / "f").read_text() == "x" and cache.get("k") == first
    assert cache.get_or_build("k", build) == first and len(calls) == 1


def test_failed_build_leaves_nothing(tmp_path):
    cache = DerivedCache(tmp_path)

    def broken(out):
        out.mkdir()
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.get_or_build("k", broken)
    assert cache.get("k") is None
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
