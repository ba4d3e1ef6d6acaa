"""Uploaded blobs (`POST /api/blobs/sha256:<hex>`), kept as `$OLLAMA_MODELS/blobs/sha256-<hex>`.

A blob is written to a temporary file while its sha256 is computed and renamed into place
only when the digest matches, so a failed or interrupted upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import AsyncIterator

from daemon.errors import BadRequest

DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


def parse_digest(text: str) -> str:
    """The 64 lower-case hex of a `sha256:<hex>` / `sha256-<hex>` digest, else 400."""
    m = DIGEST.match(text or "")
    if not m:
        raise BadRequest("invalid digest format")
    return m.group(1).lower()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, hex_digest: str) -> Path:
        return self.root / f"sha256-{hex_digest}"

    def exists(self, hex_digest: str) -> bool:
        return self.path(hex_digest).is_file()

    async def write(self, hex_digest: str, given: str, chunks: AsyncIterator[bytes]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    f.write(chunk)
                    h.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = h.hexdigest()
            if actual != hex_digest:
                raise BadRequest(f'digest mismatch, expected "{given}", got "sha256:{actual}"')
            os.replace(tmp, self.path(hex_digest))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
