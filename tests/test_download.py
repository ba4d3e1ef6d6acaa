"""The downloader against scripted responses: ranges, restarts, retries, cancellation."""

import contextlib
import hashlib
import threading

import pytest

from daemon.store.download import DigestMismatch, Downloader, RemoteFile

DATA = bytes(range(256)) * 1000  # 256 kB


class Response:
    def __init__(self, body: bytes, status: int, gate: threading.Event | None = None):
        self.body, self.status_code, self.headers, self.gate = body, status, {}, gate

    def iter_bytes(self, size):
        for i in range(0, len(self.body), 1000):
            if self.gate is not None:
                self.gate.wait(5)
            yield self.body[i:i + 1000]


class Server:
    """open_stream(url, headers) that honours Range unless told not to."""

    def __init__(self, data=DATA, honour_range=True, fail_first=0, gate=None):
        self.data, self.honour_range, self.fail_first, self.gate = data, honour_range, fail_first, gate
        self.requests = []

    @contextlib.contextmanager
    def __call__(self, url, headers):
        self.requests.append(headers.get("Range"))
        if self.fail_first:
            self.fail_first -= 1
            raise type("TransportError", (Exception,), {})("connection reset")
        start = int(headers["Range"][6:-1]) if headers.get("Range") and self.honour_range else 0
        yield Response(self.data[start:], 206 if start else 200, self.gate)


def remote(data=DATA, **kw):
    return RemoteFile(repo="org/x", commit="c", path="w.safetensors", size=len(data), url="u",
                      sha256=hashlib.sha256(data).hexdigest(), **kw)


def fetch(tmp_path, server, file=None):
    d = Downloader(server, lambda r: None)
    t = d.subscribe(file or remote(), tmp_path / "blob", tmp_path / "blob.incomplete", {})
    assert t.done.wait(30)
    d.unsubscribe(t)
    return t


def test_full_download(tmp_path):
    t = fetch(tmp_path, server := Server())
    assert t.error is None and (tmp_path / "blob").read_bytes() == DATA and server.requests == [None]
    assert t.sha256 == hashlib.sha256(DATA).hexdigest() and not (tmp_path / "blob.incomplete").exists()


def test_resumes_from_the_partial_file(tmp_path):
    (tmp_path / "blob.incomplete").write_bytes(DATA[:100_000])
    t = fetch(tmp_path, server := Server())
    assert t.error is None and server.requests == ["bytes=100000-"] and t.fetched == len(DATA) - 100_000
    assert (tmp_path / "blob").read_bytes() == DATA


def test_a_server_that_ignores_ranges_gets_a_fresh_start(tmp_path):
    (tmp_path / "blob.incomplete").write_bytes(DATA[:100_000])
    t = fetch(tmp_path, Server(honour_range=False))
    assert t.error is None and (tmp_path / "blob").read_bytes() == DATA and t.fetched == len(DATA)


def test_network_errors_are_retried(tmp_path):
    t = fetch(tmp_path, server := Server(fail_first=2))
    assert t.error is None and len(server.requests) == 3


def test_digest_mismatch_deletes_the_partial_file(tmp_path):
    bad = remote()
    t = fetch(tmp_path, Server(data=DATA[:-1] + b"\0"), bad)
    assert isinstance(t.error, DigestMismatch) and "digest mismatch" in str(t.error)
    assert not (tmp_path / "blob").exists() and not (tmp_path / "blob.incomplete").exists()


def test_git_blob_ids_verify_small_files(tmp_path):
    small = b'{"a": 1}'
    oid = hashlib.sha1(f"blob {len(small)}\0".encode() + small).hexdigest()
    f = RemoteFile(repo="r/x", commit="c", path="config.json", size=len(small), url="u", git_oid=oid)
    assert fetch(tmp_path, Server(data=small), f).error is None
    wrong = RemoteFile(repo="r/x", commit="c", path="config.json", size=len(small), url="u", git_oid="0" * 40)
    (tmp_path / "blob").unlink()
    assert isinstance(fetch(tmp_path, Server(data=small), wrong).error, DigestMismatch)


def test_cancelled_when_the_last_subscriber_leaves_and_the_partial_stays(tmp_path):
    gate = threading.Event()
    d = Downloader(Server(gate=gate), lambda r: None)
    a = d.subscribe(remote(), tmp_path / "blob", tmp_path / "blob.incomplete", {})
    b = d.subscribe(remote(), tmp_path / "blob", tmp_path / "blob.incomplete", {})
    assert a is b and a.subscribers == 2
    d.unsubscribe(a)
    assert not a.cancel.is_set()
    gate.set()
    d.unsubscribe(b)
    assert a.done.wait(30)
    if a.error is not None:  # stopped before the end: the bytes so far are kept for a resume
        assert (tmp_path / "blob.incomplete").exists()


def test_an_existing_blob_is_not_fetched(tmp_path):
    (tmp_path / "blob").write_bytes(DATA)
    t = fetch(tmp_path, server := Server())
    assert t.error is None and server.requests == [] and t.completed == len(DATA)


def test_a_full_disk_fails_at_once_and_keeps_no_blob(tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if str(path).endswith(".incomplete") and "w" in mode else f

    monkeypatch.setattr(builtins, "open", fake_open)
    t = fetch(tmp_path, server := Server())
    assert isinstance(t.error, OSError) and t.error.errno == errno.ENOSPC
    assert len(server.requests) == 1 and not (tmp_path / "blob").exists()


def test_bytes_fetched_counts_only_what_came_over_the_network(tmp_path):
    (tmp_path / "blob.incomplete").write_bytes(DATA[:100_000])
    d = Downloader(Server(), lambda r: None)
    for _ in range(2):  # the second time the blob is there: nothing fetched
        t = d.subscribe(remote(), tmp_path / "blob", tmp_path / "blob.incomplete", {})
        assert t.done.wait(30) and t.error is None
        d.unsubscribe(t)
        assert d.bytes_fetched == len(DATA) - 100_000
