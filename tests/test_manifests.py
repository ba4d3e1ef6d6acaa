import os

import pytest

from daemon.names import ModelName
from daemon.store.manifests import FileEntry, Manifest, ManifestStore, write_atomic


def manifest(**kw) -> Manifest:
    return Manifest(source={"kind": "repo", "repo": "org/x", "revision": "main", "commit": "c0" * 20},
                    files=(FileEntry("model.safetensors", 10, "ab" * 32, "ab" * 32),), **kw)


def test_round_trip_and_digest_excludes_the_name(tmp_path):
    store = ManifestStore(tmp_path)
    m = manifest(settings={"system": "s"}, parent="base:latest")
    store.write(ModelName.parse("One:Tag"), m)
    store.write(ModelName.parse("ns/two"), m)
    a, b = store.read(ModelName.parse("one:tag")), store.read(ModelName.parse("NS/Two:latest"))
    assert a.manifest == m and b.manifest.digest == a.manifest.digest == m.digest
    assert a.path == tmp_path / "registry.ollama.ai" / "library" / "one" / "tag"
    assert sorted(s.name.display for s in store.all()) == ["ns/two:latest", "one:tag"]
    assert m.size == 10


def test_delete_tidies_empty_folders(tmp_path):
    store = ManifestStore(tmp_path)
    store.write(ModelName.parse("ns/m:t"), manifest())
    assert store.delete(ModelName.parse("ns/m:t")) and not store.delete(ModelName.parse("ns/m:t"))
    assert not (tmp_path / "registry.ollama.ai" / "ns").exists()


def test_foreign_files_are_skipped(tmp_path):
    store = ManifestStore(tmp_path)
    bad = tmp_path / "h" / "n" / "m" / "t"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert list(store.all()) == [] and store.read(ModelName.parse("x")) is None


def test_write_atomic_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f"
    write_atomic(target, b"old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_unknown_schema_is_rejected():
    with pytest.raises(ValueError):
        Manifest.from_bytes(b'{"schemaVersion": 99}')


@pytest.mark.parametrize("doc", [
    b"{not json", b"[]", b'{"schemaVersion": 1}', b'{"schemaVersion": 1, "source": "x", "files": []}',
    b'{"schemaVersion": 1, "source": {"kind": "repo", "repo": "org/x", "revision": "../../x", "commit": "' + b"0" * 40
    + b'"}, "files": []}',
    b'{"schemaVersion": 1, "source": {"kind": "files", "id": "../../.."}, "files": []}',
    b'{"schemaVersion": 1, "source": {"kind": "path", "path": "/x"}, "files": [{"path": "../x", "size": 1, '
    b'"sha256": "a"}]}',
    b'{"schemaVersion": 1, "source": {"kind": "path", "path": "/x"}, "files": [{"path": "x", "size": "1", '
    b'"sha256": "a"}]}',
])
def test_a_damaged_manifest_says_why_is_skipped_in_listing_and_deletable(tmp_path, doc, caplog):
    from daemon.store.manifests import DamagedManifest

    store = ManifestStore(tmp_path)
    store.write(ModelName.parse("good"), manifest())
    bad = store.path_of(ModelName.parse("bad"))
    bad.parent.mkdir(parents=True)
    bad.write_bytes(doc)
    with pytest.raises(DamagedManifest):
        store.read(ModelName.parse("bad"))
    assert [s.name.display for s in store.all()] == ["good:latest"]
    assert [s.name.display for s in store.all()] == ["good:latest"]
    assert sum("damaged manifest" in r.message for r in caplog.records) == 1  # logged once
    assert store.exists(ModelName.parse("bad")) and store.delete(ModelName.parse("bad"))
    assert not bad.exists()
