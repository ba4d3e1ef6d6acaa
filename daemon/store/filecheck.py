"""What a model's files must look like before the store accepts them (`/api/create` files).

A model created from files that cannot load would be listed, then fail every request. The
usual culprits are checked by their first bytes: a git-LFS pointer saved under the weights'
name (a clone without `git lfs`), a truncated download, a file of another format. Only
headers are read, so a 16 GB checkpoint is checked in milliseconds.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from daemon.errors import BadRequest

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
GGUF_MAGIC = b"GGUF"
# safetensors caps its JSON header at 100 MB (the format's own limit)
SAFETENSORS_MAX_HEADER = 100_000_000
JSON_MAX_BYTES = 64 << 20


def check_model_file(name: str, path: Path) -> None:
    """Raise BadRequest when the file `name` (as the model calls it) is not what its name says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(LFS_POINTER):
            raise BadRequest(f"{name} is a git-LFS pointer, not the file itself: fetch the real file "
                             "(git lfs pull) and upload that")
        if name.endswith(".safetensors"):
            _check_safetensors(name, f, size)
        elif name.endswith(".gguf"):
            if not head.startswith(GGUF_MAGIC):
                raise BadRequest(f"{name} is not a GGUF file (it does not start with the GGUF magic)")
        elif name.endswith(".json"):
            if size > JSON_MAX_BYTES:
                raise BadRequest(f"{name} is too large for a JSON file ({size} bytes)")
            f.seek(0)
            try:
                json.loads(f.read())
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRequest(f"{name} is not valid JSON: {exc}") from None


def _check_safetensors(name: str, f, size: int) -> None:
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise BadRequest(f"{name} is not a safetensors file: it is only {size} bytes")
    (length,) = struct.unpack("<Q", prefix)
    if length > SAFETENSORS_MAX_HEADER or 8 + length > size:
        raise BadRequest(f"{name} is not a safetensors file (or it is truncated): its header says "
                         f"{length} bytes in a file of {size}")
    try:
        header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{name} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise BadRequest(f"{name} is not a safetensors file: its header is not a JSON object")
    data = size - 8 - length
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise BadRequest(f"{name} is not a safetensors file: tensor {tensor!r} has no data offsets")
        if not 0 <= offsets[0] <= offsets[1] <= data:
            raise BadRequest(f"{name} is truncated: tensor {tensor!r} ends at byte {offsets[1]} of {data}")
