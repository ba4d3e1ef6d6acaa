"""Triton kernels for decoding: few launches per layer, each one pass over its bytes.

- nf4_matmul: y = x W^T with W in bitsandbytes' NF4 layout, read as it is: packed nibbles
  (high nibble first, row-major), one absmax per 64 weights, double-quantized absmax
  (uint8 codes, a float per 256 blocks, an offset) decoded in the kernel. A GEMV path for
  1-4 rows (int32 word loads, a byte-pair lookup table, split-K) and a tensor-core path for
  batches (the same decoding, then tl.dot per byte position).
- add_rmsnorm: the residual add and HF's RMSNorm in one pass (the sum rounded to the
  activation dtype first, as HF adds in it).
- rope_kv: RoPE on q and k, and the k/v writes into each row's KV slot, in one launch.
- decode_attention: one query token per row against its own cache length (read from a
  tensor, so the launch is graph-capturable), split over the sequence, GQA-aware.
- silu_mul: SiLU(gate) * up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- NF4 ---------------------------------------------------------------------------------

@triton.jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, DOUBLE: tl.constexpr):
    if DOUBLE:  # bitsandbytes' double quantization, decoded exactly as it decodes it
        q = tl.load(absmax_ptr + blk).to(tl.int32)
        value = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // 256) + tl.load(offset_ptr + blk // 256)
    else:
        value = tl.load(absmax_ptr + blk).to(tl.float32)
    return value


@triton.jit
def _nf4_gemv_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, pairs_ptr, bias_ptr, out_ptr, offset_ptr,
                     N, K, K_SPLIT, stride_xm, stride_om,
                     M: tl.constexpr, DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LUT16: tl.constexpr):
    """Decode-size products (M <= 4 rows). Weights are read as int32 words (8 nibbles), each
    byte decoded by one lookup in a 256-entry table of fp16 value pairs; absmax applies per
    64 weights; a program covers BLOCK_N outputs over K_SPLIT inputs, and split programs
    add their sums atomically into an fp32 output."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // 64
    wi = tl.arange(0, WORDS)
    gi = tl.arange(0, GROUPS)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    k_begin = pid_k * K_SPLIT
    acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        words = tl.load(w32 + rows[:, None] * (K // 8) + (k0 // 8) + wi[None, :], mask=row_ok[:, None], other=0)
        blk = rows[:, None] * (K // 64) + (k0 // 64) + gi[None, :]
        am = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, DOUBLE)
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BLOCK_N, GROUPS, 8)), (BLOCK_N, WORDS))
        for r in tl.static_range(M):
            xb = x_ptr + r * stride_xm + k0 + 8 * wi
            part = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
            for byte in tl.static_range(4):  # little-endian: byte b holds weights 2b (high nibble), 2b+1
                if LUT16:  # the 16 values in one 32-byte line: a conflict-free lookup per nibble
                    code16 = pairs_ptr.to(tl.pointer_type(tl.float16)) + 512
                    hi = tl.load(code16 + ((words >> (8 * byte + 4)) & 15)).to(tl.float32)
                    lo = tl.load(code16 + ((words >> (8 * byte)) & 15)).to(tl.float32)
                else:  # one lookup per byte in the 1 KB table of pairs
                    pair = tl.load(pairs_ptr + ((words >> (8 * byte)) & 255))
                    hi = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    lo = ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                x_hi = tl.load(xb + 2 * byte).to(tl.float32)
                x_lo = tl.load(xb + 2 * byte + 1).to(tl.float32)
                part += hi * x_hi[None, :] + lo * x_lo[None, :]
            if r == 0:
                acc0 += part * am
            elif r == 1:
                acc1 += part * am
            elif r == 2:
                acc2 += part * am
            else:
                acc3 += part * am
    for r in tl.static_range(M):
        if r == 0:
            y = tl.sum(acc0, axis=1)
        elif r == 1:
            y = tl.sum(acc1, axis=1)
        elif r == 2:
            y = tl.sum(acc2, axis=1)
        else:
            y = tl.sum(acc3, axis=1)
        if HAS_BIAS:
            if pid_k == 0:
                y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if ATOMIC:
            tl.atomic_add(out_ptr + r * stride_om + rows, y, mask=row_ok, sem="relaxed")
        else:
            tl.store(out_ptr + r * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _nf4_mma_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, pairs_ptr, bias_ptr, out_ptr, offset_ptr,
                    M, N, K, stride_xm, stride_om,
                    DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Batched decode (M up to 64 rows): weights decoded once per tile as in the GEMV (int32
    words, byte-pair table), then multiplied on the tensor cores: per byte position of the
    words, one tl.dot for the high nibbles and one for the low ones."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // 64
    wi = tl.arange(0, WORDS)
    gi = tl.arange(0, GROUPS)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = tl.load(w32 + rows[:, None] * (K // 8) + (k0 // 8) + wi[None, :], mask=row_ok[:, None], other=0)
        blk = rows[:, None] * (K // 64) + (k0 // 64) + gi[None, :]
        am = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, DOUBLE)
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BLOCK_N, GROUPS, 8)), (BLOCK_N, WORDS))
        xb = x_ptr + m[:, None] * stride_xm + k0 + 8 * wi[None, :]
        for byte in tl.static_range(4):
            pair = tl.load(pairs_ptr + ((words >> (8 * byte)) & 255))
            hi = ((pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * am)
            lo = (((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * am)
            x_hi = tl.load(xb + 2 * byte, mask=m_ok[:, None], other=0.0)
            x_lo = tl.load(xb + 2 * byte + 1, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x_hi, tl.trans(hi.to(x_hi.dtype)), acc)
            acc = tl.dot(x_lo, tl.trans(lo.to(x_lo.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * stride_om + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])


# Launch settings, chosen per (path, N, K) by `tune_nf4` on the card and kept here.
NF4_CONFIGS: dict[tuple, tuple] = {
    # bench/nf4_kernel.py on an H100 (Llama-3-8B shapes, batch 1)
    ("gemv", 6144, 4096): (32, 256, 4, 4, False),
    ("gemv", 4096, 4096): (32, 256, 4, 4, False),
    ("gemv", 28672, 4096): (32, 256, 4, 4, False),
    ("gemv", 4096, 14336): (64, 512, 4, 4, False),
}
MMA_DEFAULT = (64, 256, 4)  # BLOCK_N, BLOCK_K, num_warps


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class NF4Weights:
    """One or more bitsandbytes Linear4bit layers fused along the output dimension, kept in
    bitsandbytes' own NF4 layout. Double-quantized absmax stays 8-bit; each 256-block group
    carries its module's offset, so fused modules decode exactly as bitsandbytes decodes
    them one by one."""

    def __init__(self, modules: list) -> None:
        states = [m.weight.quant_state for m in modules]
        self.k = int(states[0].shape[1])
        self.n = sum(int(st.shape[0]) for st in states)
        self.code = states[0].code.float().contiguous()
        self.pairs = _pair_table(self.code)
        if any(st.blocksize != 64 or st.quant_type != "nf4" for st in states):
            raise ValueError("only NF4 with blocksize 64 is supported by the fused kernel")
        self.packed = torch.cat([m.weight.data.reshape(-1) for m in modules]).contiguous()
        double = [st.state2 is not None for st in states]
        aligned = all((st.shape[0] * st.shape[1] // 64) % 256 == 0 for st in states)
        if all(double) and aligned:
            self.absmax = torch.cat([st.absmax.reshape(-1) for st in states]).contiguous()
            self.absmax2 = torch.cat([st.state2.absmax.float().reshape(-1) for st in states]).contiguous()
            self.code2 = states[0].state2.code.float().contiguous()
            self.offset = torch.cat([torch.full((st.state2.absmax.numel(),), float(st.offset),
                                                device=self.packed.device) for st in states])
        else:  # plain absmax (or a layout that cannot be fused as is): decode it once, in fp32
            self.absmax = torch.cat([_plain_absmax(st) for st in states]).contiguous()
            self.absmax2 = self.code2 = self.offset = None
        biases = [m.bias for m in modules]
        self.bias = torch.cat([b.detach() for b in biases]).contiguous() if all(b is not None for b in biases) else None

    @property
    def double(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        parts = [self.packed, self.absmax, self.absmax2, self.offset, self.bias]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """byte -> (fp16 of its high nibble's value, fp16 of its low nibble's value) as one int32."""
    bits = code.half().view(torch.int16).to(torch.int64) & 0xFFFF
    b = torch.arange(256, device=code.device)
    pair = bits[b >> 4] | (bits[b & 15] << 16)
    pairs = torch.where(pair >= 2**31, pair - 2**32, pair).to(torch.int32)
    # the 16 fp16 values follow the 256 pairs (int32 index 256 = fp16 index 512)
    singles = (bits[0::2] | (bits[1::2] << 16))
    singles = torch.where(singles >= 2**31, singles - 2**32, singles).to(torch.int32)
    return torch.cat([pairs, singles]).contiguous()


def _plain_absmax(state) -> torch.Tensor:
    if state.state2 is None:
        return state.absmax.float().reshape(-1)
    s2 = state.state2
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:state.absmax.numel()]
    return s2.code.float()[state.absmax.long()] * scale + float(state.offset)


def _fit_block_k(block_k: int, k: int) -> int:
    """The largest of block_k, block_k/2, ... (>= 64) that divides K: the loop has no tail."""
    while block_k > 64 and (k % block_k or block_k > k):
        block_k //= 2
    return block_k


GEMV_DEFAULT = (32, 256, 4, 4, False)  # BLOCK_N, BLOCK_K, num_warps, split_k, 16-entry table


def nf4_matmul(x: torch.Tensor, w: NF4Weights, out: torch.Tensor | None = None,
               config: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(W [N, K])^T (+ bias) -> [M, N]. Up to 4 rows (decoding), the result
    is fp32 (the consumers are Triton kernels that read any float); more rows: x's dtype."""
    m, n, k = x.shape[0], w.n, w.k
    dummy = w.absmax
    common = (w.packed, w.absmax, w.absmax2 if w.double else dummy, w.code2 if w.double else dummy)
    if m <= 4:
        block_n, block_k, warps, split, lut16 = config or NF4_CONFIGS.get(("gemv", n, k), GEMV_DEFAULT)
        while split > 1 and k % (split * 64):  # each split covers whole 64-weight blocks
            split -= 1
        block_k = _fit_block_k(block_k, k // split)
        if out is None:
            out = (torch.zeros if split > 1 else torch.empty)((m, n), dtype=torch.float32, device=x.device)
        _nf4_gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, *common, w.pairs, w.bias if w.bias is not None else dummy, out, w.offset if w.double else dummy,
            n, k, k // split, x.stride(0), out.stride(0), M=m, DOUBLE=w.double, HAS_BIAS=w.bias is not None,
            ATOMIC=split > 1, BLOCK_N=block_n, BLOCK_K=block_k, LUT16=lut16, num_warps=warps)
        return out
    if k % 128:  # tl.dot needs 16 words (128 weights) per step: dequantize, then one GEMM
        full = nf4_dequantize(w, torch.empty(n * k, dtype=x.dtype, device=x.device))
        result = torch.nn.functional.linear(x, full, None if w.bias is None else w.bias.to(x.dtype))
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or NF4_CONFIGS.get(("mma", n, k), MMA_DEFAULT)
    block_k = max(128, _fit_block_k(block_k, k))
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _nf4_mma_kernel[grid](x, *common, w.pairs, w.bias if w.bias is not None else dummy, out,
                          w.offset if w.double else dummy, m, n, k, x.stride(0), out.stride(0),
                          DOUBLE=w.double, HAS_BIAS=w.bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, num_warps=warps)
    return out


@triton.jit
def _nf4_dequant_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset_ptr, out_ptr, TOTAL_BYTES,
                        DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # byte index: two weights each
    ok = j < TOTAL_BYTES
    p = tl.load(w_ptr + j, mask=ok, other=0)
    am = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (2 * j) // 64, DOUBLE)
    hi = tl.load(code_ptr + (p >> 4).to(tl.int32)) * am
    lo = tl.load(code_ptr + (p & 15).to(tl.int32)) * am
    tl.store(out_ptr + 2 * j, hi.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + 2 * j + 1, lo.to(out_ptr.dtype.element_ty), mask=ok)


def nf4_dequantize(w: NF4Weights, out: torch.Tensor) -> torch.Tensor:
    """The full matrix [N, K] in out's dtype (for prefill: dequantize, then one GEMM)."""
    total = w.packed.numel()
    dummy = w.absmax
    _nf4_dequant_kernel[(triton.cdiv(total, 1024),)](
        w.packed, w.absmax, w.absmax2 if w.double else dummy, w.code2 if w.double else dummy, w.code,
        w.offset if w.double else dummy, out, total, DOUBLE=w.double, BLOCK=1024, num_warps=4)
    return out.view(w.n, w.k)


# ---- norms, RoPE, attention, activation ---------------------------------------------------

@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, D,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * D + offs, x, mask=ok)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = (xf * r).to(out_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """norm(x + residual); returns (normed, x + residual), both in the weight's dtype (x may be
    an fp32 product). With no residual: (norm(x), x)."""
    rows, d = x.shape
    out = torch.empty((rows, d), dtype=weight.dtype, device=x.device) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = torch.empty((rows, d), dtype=weight.dtype, device=x.device)
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                                 residual_out if residual_out is not None else x, eps, d,
                                 HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(d), num_warps=8)
    return out, (residual_out if residual is not None else x)


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                    stride_qkv, H, KV, CTX,
                    D: tl.constexpr):
    t = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1 queries, H..H+KV-1 keys, H+KV.. values
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    base = qkv_ptr + t * stride_qkv + head * D
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    if head < H + KV:
        c1 = tl.load(cos_ptr + pos * D + i).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * D + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * D + i).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * D + HALF + i).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    else:
        y1 = x1
        y2 = x2
    if head < H:
        dst = q_out_ptr + (t * H + head) * D
        tl.store(dst + i, y1.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, y2.to(q_out_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        at = ((slot * KV + (head - H) % KV) * CTX + pos) * D
        if head < H + KV:
            tl.store(k_cache_ptr + at + i, y1.to(k_cache_ptr.dtype.element_ty))
            tl.store(k_cache_ptr + at + HALF + i, y2.to(k_cache_ptr.dtype.element_ty))
        else:
            tl.store(v_cache_ptr + at + i, y1.to(v_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + at + HALF + i, y2.to(v_cache_ptr.dtype.element_ty))


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
            q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KV) * D]; writes rotated k and v into the caches [S, KV, CTX, D] at
    (slots[t], positions[t]); returns rotated q [T, H, D]."""
    t = qkv.shape[0]
    q_out = torch.empty((t, heads, head_dim), dtype=k_cache.dtype, device=qkv.device) if q_out is None else q_out
    _rope_kv_kernel[(t, heads + 2 * kv_heads)](qkv, cos, sin, positions, slots, q_out, k_cache, v_cache,
                                               qkv.stride(0), heads, kv_heads, k_cache.shape[2], D=head_dim,
                                               num_warps=1)
    return q_out


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, len_ptr, part_out_ptr, part_lse_ptr,
                             scale, H, KV, CTX, SPLITS, SPLIT_LEN,
                             D: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    slot = tl.load(slot_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    d = tl.arange(0, D)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    cache = (slot * KV + kv_head) * CTX * D
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        k = tl.load(k_cache_ptr + cache + t[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + cache + t[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    part = (b * H + heads) * SPLITS + split
    tl.store(part_out_ptr + part[:, None] * D + d[None, :], out, mask=g_ok[:, None])
    tl.store(part_lse_ptr + part, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, SPLITS, D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0)  # b * H + head
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < SPLITS
    lse = tl.load(part_lse_ptr + row * SPLITS + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    d = tl.arange(0, D)
    parts = tl.load(part_out_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


class DecodeAttention:
    """Buffers and launches for one batch size: graph-safe (no host syncs, fixed shapes)."""

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, max_ctx: int, device: torch.device,
                 dtype: torch.dtype, split_len: int = 256) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.split_len = split_len
        self.splits = triton.cdiv(max_ctx, split_len)
        self.group = heads // kv_heads
        self.part_out = torch.empty((batch * heads * self.splits, head_dim), dtype=torch.float32, device=device)
        self.part_lse = torch.empty((batch * heads * self.splits,), dtype=torch.float32, device=device)
        self.out = torch.empty((batch, heads, head_dim), dtype=dtype, device=device)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor, scale: float) -> torch.Tensor:
        batch = q.shape[0]
        _decode_attention_kernel[(batch, self.kv_heads, self.splits)](
            q, k_cache, v_cache, slots, lengths, self.part_out, self.part_lse, scale, self.heads, self.kv_heads,
            k_cache.shape[2], self.splits, self.split_len, D=self.head_dim, GROUP=self.group,
            GROUP_PAD=max(16, triton.next_power_of_2(self.group)), BLOCK_T=32, num_warps=4)
        _merge_splits_kernel[(batch * self.heads,)](self.part_out, self.part_lse, self.out, self.splits,
                                                   D=self.head_dim, SPLITS_PAD=max(2, triton.next_power_of_2(self.splits)),
                                                   num_warps=4)
        return self.out[:batch]


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < I
    g = tl.load(x_ptr + row * 2 * I + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * I + I + col, mask=ok, other=0.0).to(tl.float32)
    # HF: act(gate) * up in the activation dtype
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + col, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """SiLU(gate) * up, in `dtype` (default: gate_up's; an fp32 product yields bf16 when asked)."""
    rows, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty((rows, i), dtype=dtype or gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(i, 1024))](gate_up, out, i, BLOCK=1024, num_warps=4)
    return out
