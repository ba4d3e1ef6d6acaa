"""A GGUF's tensors read straight from its blocks, over a memory map (numpy), for the CPU path.

transformers' GGUF loader dequantizes every tensor to full precision and reparses the file's
header three times (tens of seconds for a 135M model); then the CPU would multiply fp32 or
fp16 weights. Here the 4-bit blocks become the packed int4 products of engine/packed.py
without a round trip: ggml's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m) are groups of 32
codes with a scale and an offset, exactly the CPU kernel's (q - 8) * scale + zero (llama.cpp's
ggml-quants.c defines the blocks). Every other quantized type is dequantized by gguf-py and
kept as a row-wise int8 copy; float tensors stay float.

Only the Llama architecture (Llama 2 / 3, Mistral, SmolLM, TinyLlama and the many fine-tunes
written as "llama") is read this way; others take transformers' conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from daemon.backends.gguf_meta import GGUFHeader
from daemon.engine.packed import GROUP, Int4Product, Int4Weights, Int8Product, int4_packable

Q4_0, Q4_1 = 2, 3  # gguf.GGMLQuantizationType
FLOAT_TYPES = {0: np.float32, 1: np.float16}  # F32, F16 (BF16 is read through gguf-py)
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20}

# llama.cpp's tensor names for one layer -> the HF module they fill (Llama's names)
LAYER_TENSORS = {
    "attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
LAYER_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
READ_ARCHITECTURES = frozenset({"llama"})


class GGUFWeights:
    def __init__(self, path: Path, header: GGUFHeader) -> None:
        self.header = header
        self.blob = np.memmap(path, dtype=np.uint8, mode="r")

    def has(self, name: str) -> bool:
        return name in self.header.tensors

    def _raw(self, name: str) -> tuple[np.ndarray, int, int, int]:
        """The tensor's bytes, its type, rows (N) and row length (K)."""
        info = self.header.tensors[name]
        k = info.shape[0]
        n = int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        per, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        nbytes = n * (k // per) * size
        if info.offset + nbytes > len(self.blob) or k % per:
            raise ValueError(f"tensor {name} lies outside the file or does not fill its blocks")
        return self.blob[info.offset:info.offset + nbytes], info.ggml_type, n, k

    def float(self, name: str) -> torch.Tensor:
        """Any tensor, dequantized to float32, in HF's orientation ([N, K], or [K] for vectors)."""
        raw, ggml_type, n, k = self._raw(name)
        if ggml_type in FLOAT_TYPES:
            values = raw.view(FLOAT_TYPES[ggml_type]).astype(np.float32)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            values = dequantize(np.asarray(raw), GGMLQuantizationType(ggml_type)).astype(np.float32, copy=False)
        tensor = torch.from_numpy(np.ascontiguousarray(values).reshape(n, k))
        return tensor[0] if len(self.header.tensors[name].shape) == 1 else tensor

    def int4(self, name: str) -> Int4Weights | None:
        """A Q4_0 / Q4_1 matrix as int4 groups (exactly its values); None for other types."""
        raw, ggml_type, n, k = self._raw(name)
        if ggml_type not in BLOCK_BYTES:
            return None
        blocks = np.asarray(raw).reshape(n, k // GROUP, BLOCK_BYTES[ggml_type])
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        quants = blocks[..., -16:]
        # a block's byte j holds element j (low nibble) and element j + 16 (high nibble)
        codes = np.concatenate([quants & 0x0F, quants >> 4], axis=-1).reshape(n, k)
        if ggml_type == Q4_0:
            zero = np.zeros_like(d)
        else:  # w = d * q + m = (q - 8) * d + (m + 8 d)
            zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
        return Int4Weights(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))

    def product(self, name: str, rows: np.ndarray | None = None) -> Int4Product | Int8Product | torch.Tensor:
        """A matrix as the CPU multiplies it fastest: 4-bit blocks packed as they are, other
        quantized types as row-wise int8, float ones as a float tensor. `rows` reorders the
        output rows (Llama's q and k, which llama.cpp stores permuted)."""
        four = self.int4(name)
        if four is not None and int4_packable(*four.codes.shape):
            if rows is not None:
                four = Int4Weights(four.codes[rows], four.scale[rows], four.zero[rows])
            return Int4Product(four)
        weight = four.dequantize() if four is not None else self.float(name)
        if rows is not None:
            weight = weight[rows]
        if self.header.tensors[name].ggml_type in FLOAT_TYPES:
            return weight
        return Int8Product(weight)


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's q/k permutation (convert_hf_to_gguf.py's permute,
    transformers' reverse_permute_weights): HF's rotate-half layout from ggml's interleaved one."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)
