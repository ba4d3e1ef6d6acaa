"""The CPU's block-quantized products in C (engine/cpu_kernels.c), compiled once per machine
and called through ctypes; `load()` gives None where they cannot run, and engine/packed.py then
uses PyTorch's own int4 / int8 kernels.

Why C: on an AVX2 CPU (no AVX-512) PyTorch's `_weight_int4pack_mm_for_cpu` turns every 4-bit
weight into a float before multiplying it, about 48 us for one of SmolLM2's 576 x 1,728 products
at one row: half a decode step, bound by arithmetic while llama.cpp's whole token takes less.
ggml multiplies its blocks as integers (activations quantized to int8 per block of 32,
`vpmaddubsw`) and streams the weights at memory speed; the C file does the same on the same block
layouts (Q4_1, Q8_0), so a GGUF's blocks are used as they are, with int16 activations
(`vpmaddwd`): int8 loses too much beside SmolLM2's activation outliers (cpu_kernels.c says how much).

The library is built with the system's C compiler (`cc`, about a second) into the user's cache
(~/.cache/hfollama/kernels, named by a hash of the source and flags; written to a temporary
name and renamed, so a concurrent or interrupted build never leaves a half-written file), or into
a private temporary folder where that cannot be written. It is linked with -fopenmp against the
libgomp that PyTorch has already loaded (the same soname), so its parallel loops run on the
same OpenMP threads as PyTorch's ops instead of a second pool competing for the cores.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
BLOCK = 32  # weights per block, along the input dimension
Q4_1_BYTES, Q8_0_BYTES = 20, 34  # ggml's block_q4_1 and block_q8_0
_ARGS = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int)


@dataclass(frozen=True)
class BlockKernels:
    """The compiled library's two products: x [..., k] fp32 times blocks [n, k / 32, bytes]."""

    library: ctypes.CDLL

    def q4_1(self, blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._matmul(self.library.hf_q4_1_matmul, blocks, x, bias)

    def q8_0(self, blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._matmul(self.library.hf_q8_0_matmul, blocks, x, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """HF's RMSNorm of fp32 rows over the last dimension (weight fp32 of that length)."""
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape, dtype=torch.float32)
        self.library.hf_rms_norm(flat.data_ptr(), weight.data_ptr(), flat.shape[0], k, eps, out.data_ptr())
        return out.view(x.shape)

    @staticmethod
    def _matmul(function, blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = blocks.shape[0], blocks.shape[1] * BLOCK
        flat = x.reshape(-1, k)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        out = torch.empty((flat.shape[0], n), dtype=torch.float32)
        if flat.shape[0]:
            rc = function(blocks.data_ptr(), n, k, flat.data_ptr(), flat.shape[0],
                          None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
            if rc:
                raise MemoryError(f"the CPU block product could not allocate its scratch ({rc})")
        return out.view(*x.shape[:-1], n)


def cpu_supports() -> bool:
    """x86-64 with AVX2, FMA and F16C, and PyTorch not held below AVX2 (ATEN_CPU_CAPABILITY)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    present = set(flags.split(":", 1)[1].split())
    return all(flag in present for flag in REQUIRED_CPU_FLAGS)


@functools.cache
def load() -> BlockKernels | None:
    """The kernels, built on first use; None where the CPU or the machine cannot have them."""
    if not cpu_supports():
        return None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: the CPU path uses PyTorch's int4 kernel (slower on AVX2-only CPUs)")
        return None
    try:
        return _open(_build(Path(compiler)))
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        log.warning("the CPU block kernels could not be built (%s): using PyTorch's", error)
        return None


def _build(compiler: Path) -> Path:
    version = subprocess.run([str(compiler), "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version]).encode()).hexdigest()[:16]
    name = f"cpu_kernels-{digest}.so"
    for folder in (Path.home() / ".cache" / "hfollama" / "kernels", None):
        try:
            if folder is None:  # a private folder of this process's own
                folder = Path(tempfile.mkdtemp(prefix="hfollama-kernels-"))
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            if target.exists():
                return target
            partial = folder / f".{name}.{os.getpid()}.tmp"
            try:
                subprocess.run([str(compiler), *FLAGS, str(SOURCE), "-o", str(partial)], check=True,
                               capture_output=True, timeout=120)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            return target
        except PermissionError:
            continue
    raise OSError("no writable folder for the CPU kernels")


def _open(path: Path) -> BlockKernels:
    library = ctypes.CDLL(str(path))
    for name in ("hf_q4_1_matmul", "hf_q8_0_matmul"):
        function = getattr(library, name)
        function.argtypes, function.restype = _ARGS, ctypes.c_int
    library.hf_rms_norm.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                    ctypes.c_void_p)
    library.hf_rms_norm.restype = None
    library.hf_block_bytes.argtypes, library.hf_block_bytes.restype = (ctypes.c_int,), ctypes.c_int
    if (library.hf_block_bytes(0), library.hf_block_bytes(1)) != (Q4_1_BYTES, Q8_0_BYTES):
        raise ValueError("the compiled blocks do not have ggml's sizes")
    return BlockKernels(library)
