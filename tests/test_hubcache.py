import os

import pytest

from daemon.store.hubcache import HubCache
from daemon.store.pathnames import UnsafeName

BLOB = "ab" * 32  # an LFS sha256
OID = "e1" * 20  # a git blob id
COMMIT = "c0ffee" + "0" * 34


def test_layout_matches_huggingface_hub(tmp_path):
    cache = HubCache(tmp_path)
    blob = cache.blob("org/name", BLOB)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"data")
    link = cache.link("org/name", COMMIT, "sub/model.safetensors", BLOB)
    assert link == tmp_path / "models--org--name" / "snapshots" / COMMIT / "sub" / "model.safetensors"
    assert os.readlink(link) == f"../../../blobs/{BLOB}" and link.read_bytes() == b"data"
    cache.link("org/name", COMMIT, "sub/model.safetensors", BLOB)  # idempotent
    cache.set_ref("org/name", "main", COMMIT)
    assert (tmp_path / "models--org--name" / "refs" / "main").read_text() == COMMIT
    cache.set_ref("org/name", "refs/pr/1", COMMIT)  # the Hub's pull-request revisions nest
    assert (tmp_path / "models--org--name" / "refs" / "refs" / "pr" / "1").read_text() == COMMIT
    assert cache.partial("org/name", BLOB).name == f"{BLOB}.incomplete"


def test_huggingface_hub_reads_it(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    cache = HubCache(tmp_path)
    cache.blob("org/name", OID).parent.mkdir(parents=True)
    cache.blob("org/name", OID).write_text("{}")
    cache.link("org/name", COMMIT, "config.json", OID)
    cache.set_ref("org/name", "main", COMMIT)
    found = try_to_load_from_cache("org/name", "config.json", cache_dir=tmp_path)
    assert found is not None and os.path.samefile(found, cache.blob("org/name", OID))


@pytest.mark.parametrize("call", [
    lambda c: c.set_ref("org/name", "../../x", COMMIT),
    lambda c: c.set_ref("org/name", "main/../../../x", COMMIT),
    lambda c: c.set_ref("org/name", "/etc/x", COMMIT),
    lambda c: c.set_ref("org/name", "main", "../../" + "0" * 34),
    lambda c: c.link("org/name", COMMIT, "../../../../x", BLOB),
    lambda c: c.link("org/name", COMMIT, "/tmp/x", BLOB),
    lambda c: c.link("org/name", COMMIT, "a\\..\\..\\x", BLOB),
    lambda c: c.link("org/name", COMMIT, "config.json", "../../x"),
    lambda c: c.link("org/name", "../" + COMMIT[3:], "config.json", BLOB),
    lambda c: c.link("../..", COMMIT, "config.json", BLOB),
    lambda c: c.blob("org/..", BLOB),
])
def test_names_from_a_server_never_leave_the_cache(tmp_path, call):
    """A Hub mirror names revisions, commits, files and blobs: one that would climb out of
    the store is refused before anything is written."""
    root = tmp_path / "store" / "hub"
    with pytest.raises(UnsafeName):
        call(HubCache(root))
    assert sorted(p for p in tmp_path.rglob("*")) == []
