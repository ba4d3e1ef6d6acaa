"""Triton kernels for the decode step besides its matrix products (those are in gemv.py): few
launches per layer, each one pass over its bytes.

- add_rmsnorm: the residual add and HF's RMSNorm in one pass (the sum rounded to the
  activation dtype first, as HF adds in it).
- rope_kv: RoPE on q and k, and the k/v writes into each row's KV slot, in one launch
  (rotate_and_store is also the QKV GEMV's epilogue).
- decode_attention: one query token per row against its own cache length (read from a
  tensor, so the launch is graph-capturable), split over the sequence, GQA-aware.
- silu_mul: SiLU(gate) * up.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


# ---- programmatic dependent launch ----------------------------------------------------------
# On Hopper and later, the small kernels of the decode chain (norm, RoPE, attention, merge,
# SiLU) are launched with PDL: each lets the next one launch as soon as all its programs have
# started, and waits for the previous kernel's results before reading or writing anything.
# Every such kernel waits before it finishes, so the order of completion, and what each
# reads, is as without PDL. (The GEMVs, in gemv.py, only trigger.)

@triton.jit
def _pdl_start(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@functools.lru_cache(maxsize=None)
def pdl_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# ---- norms, RoPE, attention, activation ---------------------------------------------------

@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, D,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
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
    pdl = pdl_available(x.device)
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight, out,
                                 residual_out if residual_out is not None else x, eps, d,
                                 HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(d), PDL=pdl,
                                 num_warps=8, launch_pdl=pdl)
    return out, (residual_out if residual is not None else x)


@triton.jit
def rotate_and_store(x1, x2, d, head, pos, slot_at, q_head_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
                     H, KV, CTX, D: tl.constexpr):
    """Dims d and D/2 + d (x1, x2 in fp32) of head `head` (0..H-1 queries, then KV keys, then
    KV values) at position pos: q and k rotated (HF's rotate_half form); q stored at
    q_head_ptr, k and v into the caches [S, KV, CTX, D] at the slot read from slot_at."""
    if head < H + KV:
        c1 = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * D + D // 2 + d).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * D + D // 2 + d).to(tl.float32)
        # fused multiply-adds written out: left to the compiler, the GEMV epilogue and the RoPE
        # kernel contracted x2 * c2 + x1 * s2 around different products (1-ulp differences)
        y1 = tl.fma(x1, c1, -(x2 * s1))
        y2 = tl.fma(x2, c2, x1 * s2)
    else:
        y1 = x1
        y2 = x2
    if head < H:
        tl.store(q_head_ptr + d, y1.to(q_head_ptr.dtype.element_ty))
        tl.store(q_head_ptr + D // 2 + d, y2.to(q_head_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_at).to(tl.int64)
        at = ((slot * KV + (head - H) % KV) * CTX + pos) * D
        if head < H + KV:
            tl.store(k_cache_ptr + at + d, y1.to(k_cache_ptr.dtype.element_ty))
            tl.store(k_cache_ptr + at + D // 2 + d, y2.to(k_cache_ptr.dtype.element_ty))
        else:
            tl.store(v_cache_ptr + at + d, y1.to(v_cache_ptr.dtype.element_ty))
            tl.store(v_cache_ptr + at + D // 2 + d, y2.to(v_cache_ptr.dtype.element_ty))


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                    stride_qkv, H, KV, CTX,
                    D: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    t = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1 queries, H..H+KV-1 keys, H+KV.. values
    i = tl.arange(0, D // 2)
    base = qkv_ptr + t * stride_qkv + head * D
    rotate_and_store(tl.load(base + i).to(tl.float32), tl.load(base + D // 2 + i).to(tl.float32), i, head,
                     tl.load(pos_ptr + t), slot_ptr + t, q_out_ptr + (t * H + head) * D, cos_ptr, sin_ptr,
                     k_cache_ptr, v_cache_ptr, H, KV, CTX, D)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
            q_out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KV) * D]; writes rotated k and v into the caches [S, KV, CTX, D] at
    (slots[t], positions[t]); returns rotated q [T, H, D]."""
    t = qkv.shape[0]
    q_out = torch.empty((t, heads, head_dim), dtype=k_cache.dtype, device=qkv.device) if q_out is None else q_out
    pdl = pdl_available(qkv.device)
    _rope_kv_kernel[(t, heads + 2 * kv_heads)](qkv, cos, sin, positions, slots, q_out, k_cache, v_cache,
                                               qkv.stride(0), heads, kv_heads, k_cache.shape[2], D=head_dim,
                                               PDL=pdl, num_warps=1, launch_pdl=pdl)
    return q_out


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, len_ptr, part_out_ptr, part_lse_ptr,
                             scale, H, KV, CTX, SPLITS, SPLIT_LEN,
                             D: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * SPLIT_LEN
    if start >= length:  # a split past the row's length: the merge reads none of it
        return
    slot = tl.load(slot_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    d = tl.arange(0, D)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0)
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
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, len_ptr, H, SPLITS, SPLIT_LEN,
                         D: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)  # b * H + head
    s = tl.arange(0, SPLITS_PAD)
    used = tl.cdiv(tl.load(len_ptr + row // H), SPLIT_LEN)  # splits past the row's length hold nothing
    s_ok = (s < SPLITS) & (s < used)
    lse = tl.load(part_lse_ptr + row * SPLITS + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    d = tl.arange(0, D)
    parts = tl.load(part_out_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


class DecodeAttention:
    """Buffers and launches for one batch size: graph-safe (no host syncs, fixed shapes)."""

    MAX_SPLITS = 64

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, max_ctx: int, device: torch.device,
                 dtype: torch.dtype, split_len: int | None = None) -> None:
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        # short splits keep each program's loop short (a decode step waits for its slowest
        # program); at most MAX_SPLITS keep the merge small for long contexts
        self.split_len = split_len or max(64, triton.next_power_of_2(triton.cdiv(max_ctx, self.MAX_SPLITS)))
        self.splits = triton.cdiv(max_ctx, self.split_len)
        self.group = heads // kv_heads
        self.part_out = torch.empty((batch * heads * self.splits, head_dim), dtype=torch.float32, device=device)
        self.part_lse = torch.empty((batch * heads * self.splits,), dtype=torch.float32, device=device)
        self.out = torch.empty((batch, heads, head_dim), dtype=dtype, device=device)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor, scale: float) -> torch.Tensor:
        batch = q.shape[0]
        pdl = pdl_available(q.device)
        _decode_attention_kernel[(batch, self.kv_heads, self.splits)](
            q, k_cache, v_cache, slots, lengths, self.part_out, self.part_lse, scale, self.heads, self.kv_heads,
            k_cache.shape[2], self.splits, self.split_len, D=self.head_dim, GROUP=self.group,
            GROUP_PAD=max(16, triton.next_power_of_2(self.group)), BLOCK_T=32, PDL=pdl, num_warps=4,
            launch_pdl=pdl)
        _merge_splits_kernel[(batch * self.heads,)](
            self.part_out, self.part_lse, self.out, lengths, self.heads, self.splits, self.split_len,
            D=self.head_dim, SPLITS_PAD=max(2, triton.next_power_of_2(self.splits)), PDL=pdl, num_warps=4,
            launch_pdl=pdl)
        return self.out[:batch]


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
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
    pdl = pdl_available(gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(i, 1024))](gate_up, out, i, BLOCK=1024, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out
