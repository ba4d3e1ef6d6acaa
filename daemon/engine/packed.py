"""Weight-only quantized matrix products for the CPU: 4-bit and 8-bit weights in blocks of 32
along the input dimension, multiplied by the C kernels of engine/cpu_kernels.py (ggml's block
layouts and integer dot products, on x86 CPUs with AVX2) or, where those cannot run, by
PyTorch's own packed CPU kernels (the ones torchao and gpt-fast use for int4 / int8 weight-only
decoding).

Decoding one token reads every weight once, and on a CPU the product of a vector with fp16 or
fp32 weights runs at the speed those bytes stream from memory; 4-bit weights are a quarter of
fp16's bytes. Both kernels hold w = (q - 8) * scale + zero in groups of 32, a GGUF's Q4_0 and
Q4_1 blocks exactly (backends/gguf_weights.py): the C kernel as ggml's Q4_1 {fp16 d, fp16 m,
codes} with m = zero - 8 * scale, PyTorch's `_weight_int4pack_mm_for_cpu` as its own packed
layout with a bf16 scale and zero. 8-bit weights are Q8_0 blocks (one fp16 scale per 32, a
GGUF's Q8_0 exactly) for the C kernel, int8 rows with one scale per row for
`torch._weight_int8pack_mm`. The C kernels take and give fp32 (they quantize the activations
to int16 per block of 32); PyTorch's need bf16 activations to be fast (measured on a
2-core AVX-512 machine: 0.1 ms for a 1728x576 int4 product at one row, 1.9 ms with fp32
activations), so a product casts its input to bf16 there and gives bf16, which the caller casts
back to the path's dtype.

A product is packed for its kernel on first use (`_pack`), so that parts fused into one larger
product (q/k/v, gate/up: engine/forward.py's `fuse`) are never packed themselves.

`PackedLinear` is the nn.Module a loader puts in place of an HF model's nn.Linear, so the HF
model still runs on its own (transformers' generate() in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daemon.engine import cpu_kernels
from daemon.engine.cpu_kernels import BlockKernels

GROUP = cpu_kernels.BLOCK  # input features per scale and zero (a GGUF block)
PACK_ROWS = 64  # _convert_weight_to_int4pack_for_cpu lays rows out in blocks of up to this many
ACTIVATION_DTYPE = torch.bfloat16


@dataclass
class Int4Weights:
    """w[n, k] = (codes[n, k] - 8) * scale[n, k // GROUP] + zero[n, k // GROUP]."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // GROUP]
    zero: torch.Tensor  # float32 [N, K // GROUP]

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(GROUP, dim=1)  # noqa: E731
        return (self.codes.float() - 8) * expand(self.scale) + expand(self.zero)

    def q4_1_blocks(self) -> torch.Tensor:
        """ggml's Q4_1 blocks [N, K / GROUP, 20]: fp16 d, fp16 m (w = d * q + m), then byte j
        holding code j in its low nibble and code j + 16 in its high one."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, k // GROUP, GROUP)
        half = GROUP // 2
        nibbles = codes[..., :half] | (codes[..., half:] << 4)
        as_bytes = lambda t: t.to(torch.float16).view(torch.uint8).reshape(n, k // GROUP, 2)  # noqa: E731
        return torch.cat([as_bytes(self.scale), as_bytes(self.zero - 8 * self.scale), nibbles], dim=-1).contiguous()


def quantize_int4(weight: torch.Tensor) -> Int4Weights:
    """Min-max 4-bit groups of a float matrix [N, K] (K a multiple of GROUP)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-12)
    codes = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return Int4Weights(codes.reshape(n, k), scale, low + 8 * scale)


def _float_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float().contiguous()


class Int4Product:
    kind = "int4"

    def __init__(self, weights: Int4Weights | None, bias: torch.Tensor | None = None,
                 packed: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None) -> None:
        """`packed`: already in a kernel's layout, ggml's Q4_1 blocks [N, K / GROUP, 20] (the C
        kernel's) or PyTorch's pair of packed codes and scales."""
        if packed is None:
            n, k = weights.codes.shape
            if not int4_packable(n, k):
                raise ValueError(f"a {n}x{k} matrix does not pack into int4 groups of {GROUP}")
        elif isinstance(packed, torch.Tensor):
            n, k = packed.shape[0], packed.shape[1] * GROUP
        else:
            n, k = packed[0].shape[0], packed[0].shape[1] * 2
        self.out_features, self.in_features = n, k
        self.weights = weights  # until packed: a product fused into a larger one is never packed itself
        self._packed = packed
        self._kernels: BlockKernels | None = cpu_kernels.load()
        self.bias = bias if self._kernels is None else _float_bias(bias)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        w = self.weights
        if self._kernels is not None:
            self._packed = w.q4_1_blocks()
        else:
            self._packed = (torch._convert_weight_to_int4pack_for_cpu(w.codes.to(torch.int32), 1),
                            torch.stack([w.scale.t(), w.zero.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous())
        self.weights = None
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed if self._packed is not None else self._pack()
        if self._kernels is not None:
            return self._kernels.q4_1(packed, x, self.bias)
        codes, scales_and_zeros = packed
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch._weight_int4pack_mm_for_cpu(flat, codes, GROUP, scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        groups = self.out_features * self.in_features // GROUP
        return self.out_features * self.in_features // 2 + groups * 2 * 2  # codes, a 16-bit scale and zero

    @staticmethod
    def fuse(parts: list["Int4Product"]) -> "Int4Product | None":
        bias = _fused_bias(parts)
        if all(p.weights is not None for p in parts):
            w = [p.weights for p in parts]
            return Int4Product(Int4Weights(torch.cat([x.codes for x in w]), torch.cat([x.scale for x in w]),
                                           torch.cat([x.zero for x in w])), bias)
        packed = [p._packed if p._packed is not None else p._pack() for p in parts]
        if parts[0]._kernels is not None:  # blocks join on any row
            return Int4Product(None, bias, packed=torch.cat(packed))
        # PyTorch's kernel packs rows in blocks of PACK_ROWS: its parts concatenate only on whole blocks.
        if any(p.out_features % PACK_ROWS for p in parts[:-1]):
            return None
        return Int4Product(None, bias, packed=(torch.cat([a for a, _ in packed]), torch.cat([b for _, b in packed], dim=1)))


def int4_packable(rows: int, cols: int) -> bool:
    return rows % 16 == 0 and cols % GROUP == 0


def q8_0_blocks(weight: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_0 blocks [N, K / GROUP, 34] of a float matrix: an fp16 scale max|w| / 127 per
    32 weights, then the 32 codes round(w / scale) (a GGUF's Q8_0, dequantized, comes back
    exactly: its largest code is 127)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).to(torch.float16)
    wide = scale.float()
    divisor = torch.where(wide > 0, wide, 1.0)  # a scale that underflows fp16: its block's codes round to 0
    codes = (groups / divisor[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([scale.view(torch.uint8).reshape(n, k // GROUP, 2), codes.view(torch.uint8)], dim=-1).contiguous()


class Int8Product:
    """w[n, k] = q[n, k] * scale: Q8_0 blocks of any float matrix for the C kernel (K a multiple
    of GROUP), else a row-wise int8 copy with one scale per row."""

    kind = "int8"

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, blocks: torch.Tensor | None = None) -> None:
        """A float `weight` is quantized; int8 rows with their `scale`, or Q8_0 `blocks`, are
        taken as they are."""
        kernels = cpu_kernels.load()
        if blocks is None and scale is None and kernels is not None and weight.shape[1] % GROUP == 0:
            blocks = q8_0_blocks(weight)
        self.blocks = blocks
        self._kernels = kernels if blocks is not None else None
        if blocks is not None:
            self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * GROUP
            self.weight = self.scale = None
            self.bias = _float_bias(bias)
            return
        if scale is None:  # quantize a float matrix
            scale = (weight.float().abs().amax(dim=1) / 127).clamp_min(1e-12)
            weight = (weight.float() / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.weight = weight.contiguous()
        self.scale = scale.float()
        self.kernel_scale = self.scale.to(ACTIVATION_DTYPE)
        self.out_features, self.in_features = weight.shape
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None:
            return self._kernels.q8_0(self.blocks, x, self.bias)
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch._weight_int8pack_mm(flat, self.weight, self.kernel_scale).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        if self.blocks is None:
            return self.weight.float() * self.scale[:, None]
        scale = self.blocks[..., :2].contiguous().view(torch.float16).float()
        codes = self.blocks[..., 2:].contiguous().view(torch.int8).float()
        return (codes * scale).reshape(self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        if self.blocks is not None:
            return self.blocks.numel()
        return self.weight.numel() + self.kernel_scale.numel() * 2

    @staticmethod
    def fuse(parts: list["Int8Product"]) -> "Int8Product":
        if all(p.blocks is not None for p in parts):
            return Int8Product(None, _fused_bias(parts), blocks=torch.cat([p.blocks for p in parts]))
        if any(p.blocks is not None for p in parts):
            return Int8Product(torch.cat([p.dequantize() for p in parts]), _fused_bias(parts))
        return Int8Product(torch.cat([p.weight for p in parts]), _fused_bias(parts),
                           scale=torch.cat([p.scale for p in parts]))


Product = Int4Product | Int8Product


def _fused_bias(parts: list[Product]) -> torch.Tensor | None:
    biases = [p.bias for p in parts]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])


def fuse(products: list[Product]) -> Product | None:
    """One product for several of the same kind, concatenated along the output; None when
    their kinds differ or they cannot be joined (the caller then runs them one by one)."""
    kinds = {type(p) for p in products}
    if len(kinds) != 1:
        return None
    return products[0] if len(products) == 1 else kinds.pop().fuse(products)


class PackedLinear(torch.nn.Module):
    """An nn.Linear's place in an HF model, holding a packed product."""

    def __init__(self, product: Product) -> None:
        super().__init__()
        self.product = product
        self.in_features, self.out_features = product.in_features, product.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.product.kind}, in_features={self.in_features}, out_features={self.out_features}"
