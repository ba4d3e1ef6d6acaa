"""A header-only GGUF reader: the key/value metadata and the tensor table, nothing else.

/api/show and /api/tags need a GGUF's metadata in milliseconds. gguf-py's GGUFReader
parses every array element into numpy views (about 11 s for a 49k-token vocabulary), and
transformers reads the file three times when it loads it. This reader walks the header
once and skips long arrays by their byte lengths, the way Ollama's own loader keeps arrays
of more than a few items out of model_info. The tensor table (type, shape, where the data
lies) is what backends/gguf_weights.py reads the blocks by.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9

# ggml file types (llama.cpp's LLAMA_FTYPE_*), as Ollama reports quantization_level.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}

MAX_ARRAY_ITEMS = 5  # longer arrays come back empty, as in Ollama's non-verbose show
DEFAULT_ALIGNMENT = 32  # the tensor data starts at a multiple of general.alignment


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (input) dimension
    ggml_type: int  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    @property
    def parameter_count(self) -> int:
        total = 0
        for shape in self.tensor_shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str, size: int) -> Any:
        if self.pos + size > len(self.buf):
            raise GGUFFormatError("truncated GGUF header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q", 8)
        if self.pos + n > len(self.buf):
            raise GGUFFormatError("truncated GGUF string")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q", 8)
        self.pos += n

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack("<I", 4)
            count = self.unpack("<Q", 8)
            if keep_arrays or count <= MAX_ARRAY_ITEMS:
                return [self.value(etype, keep_arrays) for _ in range(count)]
            if etype in _SCALARS:
                self.pos += count * _SCALARS[etype][1]
            elif etype == _STRING:
                for _ in range(count):
                    self.skip_string()
            else:
                for _ in range(count):
                    self.value(etype, False)
            return []
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: Path, keep_arrays: bool = False) -> GGUFHeader:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file")
        cur.pos = 4
        version = cur.unpack("<I", 4)
        if version < 2:
            raise GGUFFormatError(f"GGUF version {version} is not supported")
        n_tensors = cur.unpack("<Q", 8)
        n_kv = cur.unpack("<Q", 8)
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I", 4)
            metadata[key] = cur.value(vtype, keep_arrays)
        table: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I", 4)
            dims = tuple(cur.unpack("<Q", 8) for _ in range(n_dims))
            ggml_type = cur.unpack("<I", 4)
            table.append((name, dims, ggml_type, cur.unpack("<Q", 8)))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {name: TensorInfo(dims, ggml_type, data_start + offset) for name, dims, ggml_type, offset in table}
        return GGUFHeader(version=version, metadata=metadata, tensors=tensors)
