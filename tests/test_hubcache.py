import os

from daemon.store.hubcache import HubCache


def test_layout_matches_huggingface_hub(tmp_path):
    cache = HubCache(tmp_path)
    blob = cache.blob("org/name", "abc")
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"data")
    link = cache.link("org/name", "c0ffee", "sub/model.safetensors", "abc")
    assert link == tmp_path / "models--org--name" / "snapshots" / "c0ffee" / "sub" / "model.safetensors"
    assert os.readlink(link) == "../../../blobs/abc" and link.read_bytes() == b"data"
    cache.link("org/name", "c0ffee", "sub/model.safetensors", "abc")  # idempotent
    cache.set_ref("org/name", "main", "c0ffee")
    assert (tmp_path / "models--org--name" / "refs" / "main").read_text() == "c0ffee"
    assert cache.partial("org/name", "abc").name == "abc.incomplete"


def test_huggingface_hub_reads_it(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    cache = HubCache(tmp_path)
    cache.blob("org/name", "e1").parent.mkdir(parents=True)
    cache.blob("org/name", "e1").write_text("{}")
    cache.link("org/name", "c1", "config.json", "e1")
    cache.set_ref("org/name", "main", "c1")
    found = try_to_load_from_cache("org/name", "config.json", cache_dir=tmp_path)
    assert found is not None and os.path.samefile(found, cache.blob("org/name", "e1"))
