"""Weight-only quantized matrix products for the CPU: 4-bit and 8-bit weights multiplied by
PyTorch's own packed CPU kernels (the ones torchao and gpt-fast use for int4 / int8 weight-only
decoding), activations in bf16.

Decoding one token reads every weight once, and on a CPU the product of a vector with fp16 or
fp32 weights runs at the speed those bytes stream from memory; 4-bit weights are a quarter of
fp16's bytes. `torch._weight_int4pack_mm_for_cpu` takes groups of 32 along the input dimension,
w = (q - 8) * scale + zero, which holds a GGUF's Q4_0 and Q4_1 blocks exactly
(backends/gguf_weights.py); `torch._weight_int8pack_mm` takes int8 rows with one scale per
row. Both need bf16 activations to be fast (measured on a 2-core AVX-512 machine: 0.1 ms for a
1728x576 int4 product at one row, 1.9 ms with fp32 activations), so a product casts its input
to bf16 and the caller casts the output back to the path's dtype.

`PackedLinear` is the nn.Module a loader puts in place of an HF model's nn.Linear, so the HF
model still runs on its own (transformers' generate() in the tests); engine/forward.py fuses
several of them (q/k/v, gate/up) into one product with `fuse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32  # input features per scale and zero (a GGUF block)
PACK_ROWS = 64  # _convert_weight_to_int4pack_for_cpu lays rows out in blocks of this many
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


def quantize_int4(weight: torch.Tensor) -> Int4Weights:
    """Min-max 4-bit groups of a float matrix [N, K] (K a multiple of GROUP)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-12)
    codes = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return Int4Weights(codes.reshape(n, k), scale, low + 8 * scale)


class Int4Product:
    kind = "int4"

    def __init__(self, weights: Int4Weights | None, bias: torch.Tensor | None = None,
                 packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if packed is None:
            n, k = weights.codes.shape
            if not int4_packable(n, k):
                raise ValueError(f"a {n}x{k} matrix does not pack into int4 groups of {GROUP}")
        else:
            n, k = packed[0].shape[0], packed[0].shape[1] * 2
        self.out_features, self.in_features = n, k
        self.weights = weights  # until packed: a product fused into a larger one is never packed itself
        self._packed = packed  # [N, K / 2] uint8 in the kernel's layout, bf16 [K / GROUP, N, 2]
        self.bias = bias

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights
        self._packed = (torch._convert_weight_to_int4pack_for_cpu(w.codes.to(torch.int32), 1),
                        torch.stack([w.scale.t(), w.zero.t()], dim=-1).to(ACTIVATION_DTYPE).contiguous())
        self.weights = None
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros = self._packed or self._pack()
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        groups = self.out_features * self.in_features // GROUP
        return self.out_features * self.in_features // 2 + groups * 2 * 2  # codes, a bf16 scale and zero

    @staticmethod
    def fuse(parts: list["Int4Product"]) -> "Int4Product | None":
        bias = _fused_bias(parts)
        if all(p.weights is not None for p in parts):
            w = [p.weights for p in parts]
            return Int4Product(Int4Weights(torch.cat([x.codes for x in w]), torch.cat([x.scale for x in w]),
                                           torch.cat([x.zero for x in w])), bias)
        # The kernel packs rows in blocks of PACK_ROWS: packed parts concatenate only on whole blocks.
        if any(p.out_features % PACK_ROWS for p in parts[:-1]):
            return None
        packed = [p._packed or p._pack() for p in parts]
        return Int4Product(None, bias, packed=(torch.cat([a for a, _ in packed]), torch.cat([b for _, b in packed], dim=1)))


def int4_packable(rows: int, cols: int) -> bool:
    return rows % 16 == 0 and cols % GROUP == 0


class Int8Product:
    """w[n, k] = q[n, k] * scale[n]: a row-wise int8 copy of any float matrix."""

    kind = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
        if scale is None:  # quantize a float matrix
            scale = (weight.float().abs().amax(dim=1) / 127).clamp_min(1e-12)
            weight = (weight.float() / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        self.weight = weight.contiguous()
        self.scale = scale.float()
        self.kernel_scale = self.scale.to(ACTIVATION_DTYPE)
        self.out_features, self.in_features = weight.shape
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACTIVATION_DTYPE)
        y = torch._weight_int8pack_mm(flat, self.weight, self.kernel_scale).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.kernel_scale.numel() * 2

    @staticmethod
    def fuse(parts: list["Int8Product"]) -> "Int8Product":
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
