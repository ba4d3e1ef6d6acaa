"""Downloading one file from the Hub: ranged requests that resume, fine progress, verified.

Measured with huggingface_hub 2.4 against a Hub-shaped server, its own transfer restarts a
killed download at byte 0, moves bytes to disk 10 MiB at a time and never checks the
sha256. So the library provides what it does well (URLs, auth headers, the HTTP session
and its typed errors), and this module moves the bytes:

- into `<blob>.incomplete`, resuming from its size with `Range: bytes=N-` (a server that
  answers 200 instead of 206 gets a fresh start);
- hashing while writing (sha256, and the git blob id for small non-LFS files);
- verifying size and digest before an atomic rename to the final blob name; a mismatch
  deletes the partial file and fails;
- one transfer per blob, shared by every pull that needs it; it stops (keeping the partial
  file) when the last pull that waits for it goes away;
- retrying network errors a few times, each retry resuming where the bytes stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from daemon.errors import InternalError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # reading what is already on disk
NETWORK_CHUNK = 64 << 10  # small enough that a cancelled transfer stops within a moment
RETRIES = 3


class DigestMismatch(InternalError):
    pass


class TransferCancelled(Exception):
    pass


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    commit: str
    path: str
    size: int
    url: str
    sha256: str | None = None  # known for LFS files
    git_oid: str | None = None  # the git blob id of non-LFS files

    @property
    def etag(self) -> str:
        """The blob's name in the hub cache, as huggingface_hub names it."""
        return self.sha256 or self.git_oid or hashlib.sha256(f"{self.repo}/{self.commit}/{self.path}".encode()).hexdigest()


@dataclass
class Transfer:
    file: RemoteFile
    final: Path
    partial: Path
    completed: int = 0
    sha256: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    subscribers: int = 0
    fetched: int = 0  # bytes that actually came over the network


class Downloader:
    def __init__(self, open_stream: Callable, raise_for_status: Callable) -> None:
        """open_stream(url, headers) -> context manager yielding a response with
        .status_code, .headers, .iter_bytes(); raise_for_status(response) maps HTTP errors."""
        self._open_stream = open_stream
        self._raise_for_status = raise_for_status
        self._lock = threading.Lock()
        self._active: dict[Path, Transfer] = {}
        self._fetched_done = 0  # bytes the finished transfers fetched

    @property
    def bytes_fetched(self) -> int:
        """Bytes fetched over the network by every transfer so far, running ones included."""
        with self._lock:
            return self._fetched_done + sum(t.fetched for t in self._active.values())

    def subscribe(self, file: RemoteFile, final: Path, partial: Path, headers: dict[str, str]) -> Transfer:
        """The transfer for this blob: a running one, or a new one started in a thread."""
        with self._lock:
            transfer = self._active.get(final)
            if transfer is None:
                transfer = Transfer(file, final, partial)
                self._active[final] = transfer
                threading.Thread(target=self._run, args=(transfer, headers), daemon=True,
                                 name=f"download:{file.path}").start()
            transfer.subscribers += 1
            return transfer

    def unsubscribe(self, transfer: Transfer) -> None:
        with self._lock:
            transfer.subscribers -= 1
            if transfer.subscribers <= 0 and not transfer.done.is_set():
                transfer.cancel.set()

    def _run(self, t: Transfer, headers: dict[str, str]) -> None:
        try:
            if t.final.exists():
                t.completed = t.file.size
                t.sha256 = t.file.sha256 or _sha256_of(t.final)
                return
            for attempt in range(RETRIES + 1):
                try:
                    self._fetch(t, headers)
                    return
                except (TransferCancelled, DigestMismatch):
                    raise
                except OSError as exc:  # includes network errors; disk errors are not retried
                    if _is_disk_error(exc) or attempt == RETRIES:
                        raise
                    log.warning("retrying %s after %s", t.file.path, exc)
                    time.sleep(0.5 * (attempt + 1))
                except Exception as exc:
                    if not _is_transient(exc) or attempt == RETRIES:
                        raise
                    log.warning("retrying %s after %s", t.file.path, exc)
                    time.sleep(0.5 * (attempt + 1))
        except BaseException as exc:  # reported to every subscriber
            t.error = exc
        finally:
            with self._lock:
                self._active.pop(t.final, None)
                self._fetched_done += t.fetched
            t.done.set()

    def _fetch(self, t: Transfer, headers: dict[str, str]) -> None:
        t.partial.parent.mkdir(parents=True, exist_ok=True)
        sha256, oid = hashlib.sha256(), _git_blob_hasher(t.file.size)
        offset = t.partial.stat().st_size if t.partial.exists() else 0
        if offset > t.file.size:
            t.partial.unlink()
            offset = 0
        if offset:  # hash what is already there, then ask for the rest only
            with open(t.partial, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    sha256.update(block)
                    oid.update(block)
        t.completed = offset
        if offset < t.file.size:
            request_headers = dict(headers)
            if offset:
                request_headers["Range"] = f"bytes={offset}-"
            with self._open_stream(t.file.url, request_headers) as response:
                self._raise_for_status(response)
                if offset and response.status_code != 206:
                    log.info("%s: the server ignored the range request; starting again", t.file.path)
                    offset = t.completed = 0
                    sha256, oid = hashlib.sha256(), _git_blob_hasher(t.file.size)
                with open(t.partial, "r+b" if offset else "wb") as f:
                    f.seek(offset)
                    f.truncate()
                    for block in response.iter_bytes(NETWORK_CHUNK):
                        if t.cancel.is_set():
                            raise TransferCancelled(t.file.path)
                        f.write(block)
                        sha256.update(block)
                        oid.update(block)
                        t.completed += len(block)
                        t.fetched += len(block)
                    f.flush()
                    os.fsync(f.fileno())
        self._verify(t, sha256.hexdigest(), oid.hexdigest())
        os.replace(t.partial, t.final)
        t.sha256 = sha256.hexdigest()

    @staticmethod
    def _verify(t: Transfer, sha256: str, oid: str) -> None:
        size = t.partial.stat().st_size
        problem = None
        if size != t.file.size:
            problem = f"size mismatch, file must be downloaded again: want {t.file.size} bytes, got {size}"
        elif t.file.sha256 and sha256 != t.file.sha256:
            problem = f"want sha256:{t.file.sha256}, got sha256:{sha256}"
        elif not t.file.sha256 and t.file.git_oid and oid != t.file.git_oid:
            problem = f"want git blob {t.file.git_oid}, got {oid}"
        if problem:
            t.partial.unlink(missing_ok=True)
            if not problem.startswith("size"):
                problem = f"digest mismatch, file must be downloaded again: {problem}"
            raise DigestMismatch(f"{t.file.path}: {problem}")


def _git_blob_hasher(size: int):
    h = hashlib.sha1()  # git's blob id: sha1("blob <size>\0" + content)
    h.update(f"blob {size}\0".encode())
    return h


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _is_disk_error(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def _is_transient(exc: Exception) -> bool:
    """Network trouble worth a resumed retry (httpx / httpx2 transport errors)."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError",
                          "ConnectionError"})
