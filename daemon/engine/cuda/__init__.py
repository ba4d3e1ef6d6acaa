"""The GPU decode path: Triton kernels, an NF4 matrix product over bitsandbytes' packed
weights, and a CUDA-graph-captured decode step. Imports without a GPU (CI must import it);
`available()` says whether it can run."""

from __future__ import annotations


def available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
