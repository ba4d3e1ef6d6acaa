"""Triton kernels for the decode step besides its matrix products (those are in gemv.py): few
launches per layer, each one pass over its bytes. Each reads the spec's choices as constexpr
flags (engine/spec.py), so one kernel serves every family.

- add_rmsnorm: the residual add and RMSNorm in one pass (the sum rounded to the activation
  dtype first, as HF adds in it); Llama's norm (rounded, then times w) or Gemma's ((1 + w) in
  fp32); with Gemma 2/3's sandwich norms, the incoming sublayer output normed before the add.
- rope_kv: q/k norms (Qwen3, Gemma 3), RoPE on q and k (partial rotary too), and the k/v
  writes into each row's KV slot, in one launch (rotate_and_store is also the QKV GEMV's
  epilogue, where a layer needs neither q/k norms nor partial rotary).
- decode_attention: one query token per row against its own cache length (read from a
  tensor, so the launch is graph-capturable), split over the sequence, GQA-aware, with the
  layer's sliding window and soft-capped scores; any head size (masked to a power of two).
- gated_act: act(gate) * up, SiLU or GELU (tanh).
- route_topk: a mixture of experts' routing from its router logits: softmax, top k,
  renormalization and the cast, one launch (PyTorch's softmax, topk, sum, divide and cast were
  six launches a layer, about 9 us of a decode step's 79 us per layer on Qwen3-30B-A3B).
- copy_prefix: a slot's cached prefix into other slots (prompts sharing it), one launch a cache.
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
def _normed(xf, w_ptr, offs, ok, eps, D, dtype, GEMMA: tl.constexpr, FP32_SCALE: tl.constexpr = False):
    """RMSNorm of fp32 values: Llama's (normalized, rounded to dtype, times w), Gemma's
    (normalized times (1 + w), in fp32) or gpt-oss's (FP32_SCALE: times w in fp32); fp32 out,
    not yet rounded."""
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:
        return xf * r * (1.0 + w)
    if FP32_SCALE:
        return xf * r * w
    return (xf * r).to(dtype).to(tl.float32) * w


@triton.jit
def _routed_sum(y_ptr, weights_ptr, row, offs, ok, D, K: tl.constexpr, BLOCK: tl.constexpr):
    """sum over j < K of y[row * K + j, offs] * weights[row, j], in fp32, j in order: a MoE
    layer's combine, as weighted_sum and add_rmsnorm's `combine` both compute it."""
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(K):
        w = tl.load(weights_ptr + row * K + j).to(tl.float32)
        acc += tl.load(y_ptr + (row * K + j) * D + offs, mask=ok, other=0.0).to(tl.float32) * w
    return acc


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, pre_w_ptr, out_ptr, res_out_ptr, combine_ptr, eps, D,
                        HAS_RES: tl.constexpr, PRE_NORM: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr, FP32_SCALE: tl.constexpr = False, TOP_K: tl.constexpr = 0):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    dtype = res_out_ptr.dtype.element_ty
    if TOP_K:  # x: a MoE layer's pairs, summed by their routing weights
        x = _routed_sum(x_ptr, combine_ptr, row, offs, ok, D, TOP_K, BLOCK)
    else:
        x = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0)
    if PRE_NORM:  # sandwich: the sublayer's output normed, rounded, then added
        x = _normed(x.to(tl.float32), pre_w_ptr, offs, ok, eps, D, dtype, GEMMA, FP32_SCALE).to(dtype)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32))
        x = x.to(dtype)
        tl.store(res_out_ptr + row * D + offs, x, mask=ok)
    y = _normed(x.to(tl.float32), w_ptr, offs, ok, eps, D, out_ptr.dtype.element_ty, GEMMA, FP32_SCALE)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, *,
                gemma: bool = False, pre_weight: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                fp32_scale: bool = False, combine: torch.Tensor | None = None):
    """norm(x + residual); returns (normed, x + residual), both in `dtype` (default: the weight's;
    x may be an fp32 product). With no residual: (norm(x), x). `pre_weight`: x is normed with
    it first (a sandwich norm on the sublayer's output); `gemma`: (1 + w) norms; `fp32_scale`:
    w applied before rounding (gpt-oss). `combine`: routing weights [rows, top_k], x a MoE
    layer's pairs [rows * top_k, D], summed here as weighted_sum sums them (one launch fewer);
    there is no x to return then without a residual."""
    rows, d = x.shape if combine is None else (combine.shape[0], x.shape[1])
    if combine is not None and residual is None:
        raise ValueError("a combined norm takes a residual")
    dtype = dtype or weight.dtype
    out = torch.empty((rows, d), dtype=dtype, device=x.device) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = torch.empty((rows, d), dtype=dtype, device=x.device)
    pdl = pdl_available(x.device)
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight,
                                 pre_weight if pre_weight is not None else weight, out,
                                 residual_out if residual_out is not None else out,
                                 combine if combine is not None else weight, eps, d,
                                 HAS_RES=residual is not None, PRE_NORM=pre_weight is not None, GEMMA=gemma,
                                 BLOCK=triton.next_power_of_2(d), PDL=pdl, FP32_SCALE=fp32_scale,
                                 TOP_K=0 if combine is None else combine.shape[1], num_warps=8, launch_pdl=pdl)
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
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, rope_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                    q_norm_ptr, k_norm_ptr, eps, stride_qkv, H, KV, CTX,
                    D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr, QK_NORM: tl.constexpr,
                    GEMMA: tl.constexpr, PDL: tl.constexpr):
    """One head of one token: q/k normed (QK_NORM), the first R dims rotated (rotate_half,
    with the same fused multiply-adds as rotate_and_store), stored."""
    _pdl_start(PDL)
    t = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1 queries, H..H+KV-1 keys, H+KV.. values
    d = tl.arange(0, D_PAD)
    ok = d < D
    base = qkv_ptr + t * stride_qkv + head * D
    x = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + t)
    if head < H + KV:
        row = tl.load(rope_ptr + t)  # the rotary tables' row: the position, or where a pass composed its own
        half: tl.constexpr = R // 2
        rotated = d < R
        partner = tl.where(d < half, d + half, d - half)
        xp = tl.load(base + partner, mask=rotated, other=0.0).to(tl.float32)
        if QK_NORM:  # per-head RMSNorm, rounded to the activation dtype as HF's norm returns it
            dtype = q_out_ptr.dtype.element_ty
            r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            if head < H:
                w = tl.load(q_norm_ptr + d, mask=ok, other=0.0).to(tl.float32)
                wp = tl.load(q_norm_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
            else:
                w = tl.load(k_norm_ptr + d, mask=ok, other=0.0).to(tl.float32)
                wp = tl.load(k_norm_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
            if GEMMA:
                x, xp = (x * r * (1.0 + w)).to(dtype).to(tl.float32), (xp * r * (1.0 + wp)).to(dtype).to(tl.float32)
            else:
                x = (x * r).to(dtype).to(tl.float32) * w
                xp = (xp * r).to(dtype).to(tl.float32) * wp
                x, xp = x.to(dtype).to(tl.float32), xp.to(dtype).to(tl.float32)
        c = tl.load(cos_ptr + row * R + d, mask=rotated, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + row * R + d, mask=rotated, other=0.0).to(tl.float32)
        y = tl.where(d < half, tl.fma(x, c, -(xp * s)), tl.fma(x, c, xp * s))
        x = tl.where(rotated, y, x)
    if head < H:
        tl.store(q_out_ptr + (t * H + head) * D + d, x.to(q_out_ptr.dtype.element_ty), mask=ok)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        at = ((slot * KV + (head - H) % KV) * CTX + pos) * D
        if head < H + KV:
            tl.store(k_cache_ptr + at + d, x.to(k_cache_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(v_cache_ptr + at + d, x.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
            q_out: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
            k_norm: torch.Tensor | None = None, eps: float = 1e-6, gemma: bool = False,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (H + 2 KV) * D]; writes rotated k and v into the caches [S, KV, CTX, D] at
    (slots[t], positions[t]); returns rotated q [T, H, D]. cos / sin [CTX, R]: the first R dims
    of each head rotate, by the tables' row positions[t], or rows[t] where given (multimodal
    rotary: a text row's shifted position, or a pass's own composed rows). q_norm / k_norm:
    per-head norms before the rotation."""
    t = qkv.shape[0]
    q_out = torch.empty((t, heads, head_dim), dtype=k_cache.dtype, device=qkv.device) if q_out is None else q_out
    pdl = pdl_available(qkv.device)
    _rope_kv_kernel[(t, heads + 2 * kv_heads)](
        qkv, cos, sin, positions, positions if rows is None else rows, slots, q_out, k_cache, v_cache,
        q_norm if q_norm is not None else cos,
        k_norm if k_norm is not None else cos, eps, qkv.stride(0), heads, kv_heads, k_cache.shape[2], D=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), R=cos.shape[-1], QK_NORM=q_norm is not None, GEMMA=gemma, PDL=pdl,
        num_warps=1, launch_pdl=pdl)
    return q_out


@triton.jit
def _decode_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, len_ptr, part_out_ptr, part_lse_ptr,
                             tickets_ptr, out_ptr, sinks_ptr, scale, softcap, window, H, KV, CTX, SPLITS, SPLIT_LEN,
                             D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             BLOCK_T: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                             PDL: tl.constexpr, SINKS: tl.constexpr):
    """One split of one row's keys for one KV head's GROUP query heads (flash decoding): its
    partial output and log-sum-exp per head. The last of the row's and KV head's splits to finish
    (a ticket, as the Router's) merges them: the partial outputs weighted by their log-sum-exps,
    over the splits that hold keys only (at 128 tokens of a 4,096 context, 2 of 64), where a
    second kernel a layer did it. SINKS: each head's sink logit joins the sum as one more split
    whose output is zero (gpt-oss)."""
    _pdl_start(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    first = 0
    if WINDOW:  # keys within `window` positions of the query (HF: k > q - window)
        first = tl.maximum(length - window, 0)
    start = tl.maximum(split * SPLIT_LEN, first)
    end = tl.minimum(split * SPLIT_LEN + SPLIT_LEN, length)
    if start >= end:  # a split outside the row's keys: it takes no ticket, the merge reads none of it
        return
    slot = tl.load(slot_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + (b * H + heads)[:, None] * D + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    cache = (slot * KV + kv_head) * CTX * D
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        k = tl.load(k_cache_ptr + cache + t[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:  # Gemma 2: tanh(s / cap) * cap, tanh from exp
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + cache + t[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
    rows = b * H + heads
    hd_ok = g_ok[:, None] & d_ok[None, :]
    tl.store(part_out_ptr + (rows * SPLITS + split)[:, None] * D + d[None, :], out, mask=hd_ok)
    tl.store(part_lse_ptr + rows * SPLITS + split, lse, mask=g_ok)
    lo = first // SPLIT_LEN
    used = tl.minimum(tl.cdiv(length, SPLIT_LEN), SPLITS)  # the splits lo..used hold keys
    ticket = tickets_ptr + b * KV + kv_head
    # the ticket's release orders the stores above before it; the last program's acquire sees them
    if tl.atomic_add(ticket, 1, sem="acq_rel") == used - lo - 1:
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for i in range(lo, used):
            m = tl.maximum(m, tl.load(part_lse_ptr + rows * SPLITS + i, mask=g_ok, other=0.0, volatile=True))
        total = tl.zeros([GROUP_PAD], tl.float32)
        if SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)
            m = tl.maximum(m, sink)
            total += tl.exp(sink - m)
        merged = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        for i in range(lo, used):
            lse_i = tl.load(part_lse_ptr + rows * SPLITS + i, mask=g_ok, other=float("-inf"), volatile=True)
            w = tl.where(lse_i > float("-inf"), tl.exp(lse_i - m), 0.0)
            part = tl.load(part_out_ptr + (rows * SPLITS + i)[:, None] * D + d[None, :], mask=hd_ok, other=0.0,
                           volatile=True)
            merged += w[:, None] * part
            total += w
        merged = merged / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * D + d[None, :], merged.to(out_ptr.dtype.element_ty), mask=hd_ok)
        tl.store(ticket, 0)


class DecodeAttention:
    """Buffers and launches for one batch size: graph-safe (no host syncs, fixed shapes; the
    merge's tickets are back at zero after every launch). One instance serves every layer; each
    call says the layer's window and soft-cap."""

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
        self.tickets = torch.zeros((batch * kv_heads,), dtype=torch.int32, device=device)
        self.out = torch.empty((batch, heads, head_dim), dtype=dtype, device=device)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor, scale: float, window: int | None = None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """`sinks`: [H] fp32, each head's sink logit."""
        batch = q.shape[0]
        pdl = pdl_available(q.device)
        _decode_attention_kernel[(batch, self.kv_heads, self.splits)](
            q, k_cache, v_cache, slots, lengths, self.part_out, self.part_lse, self.tickets, self.out,
            sinks if sinks is not None else lengths, scale, softcap or 1.0, window or 0, self.heads, self.kv_heads,
            k_cache.shape[2], self.splits, self.split_len, D=self.head_dim, D_PAD=triton.next_power_of_2(self.head_dim),
            GROUP=self.group, GROUP_PAD=max(16, triton.next_power_of_2(self.group)), BLOCK_T=32,
            SOFTCAP=softcap is not None, WINDOW=window is not None, PDL=pdl, SINKS=sinks is not None, num_warps=4,
            launch_pdl=pdl)
        return self.out[:batch]


@triton.jit
def activation(g, GELU: tl.constexpr):
    """The MLP's activation of fp32 gate values: SiLU, or GELU with the tanh approximation
    (tanh from exp, which the interpreter and every backend have)."""
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _gated_act_kernel(x_ptr, out_ptr, I, BLOCK: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < I
    g = tl.load(x_ptr + row * 2 * I + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * I + I + col, mask=ok, other=0.0).to(tl.float32)
    # HF: act(gate) * up in the activation dtype
    a = activation(g, GELU).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * I + col, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


# the activations gated_act and the GEMV's epilogue compute; others (gpt-oss's clamped SwiGLU) in PyTorch
KERNEL_ACTIVATIONS = frozenset({"silu", "gelu_tanh"})


def gated(gate_up: torch.Tensor, spec, dtype: torch.dtype) -> torch.Tensor:
    """act(gate) * up of a [gate; up] product as the spec's family computes it, in `dtype`: the
    kernel where it has the activation, else engine/forward.glu in fp32."""
    if spec.activation in KERNEL_ACTIVATIONS:
        return gated_act(gate_up, dtype, gelu=spec.activation == "gelu_tanh")
    from daemon.engine.forward import glu

    return glu(gate_up.float(), spec).to(dtype)


def gated_act(gate_up: torch.Tensor, dtype: torch.dtype | None = None, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up of a [gate; up] product, in `dtype` (default: gate_up's; an fp32 product
    yields bf16 when asked): SiLU, or GELU (tanh) with `gelu`."""
    rows, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty((rows, i), dtype=dtype or gate_up.dtype, device=gate_up.device)
    pdl = pdl_available(gate_up.device)
    _gated_act_kernel[(rows, triton.cdiv(i, 1024))](gate_up, out, i, BLOCK=1024, GELU=gelu, PDL=pdl, num_warps=4,
                                                    launch_pdl=pdl)
    return out


@triton.jit
def _top_k(x, e, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, SOFTMAX_AFTER: tl.constexpr,
           NORMALIZE: tl.constexpr):
    """(weights [K_PAD], experts [K_PAD], which of them are real) of one row's router logits
    x [E_PAD] fp32 (past E: -inf): the top K of softmax(x) in fp32 (renormalized with
    NORMALIZE), or with SOFTMAX_AFTER the top K logits softmaxed; ties to the lower expert."""
    if SOFTMAX_AFTER:
        p = x
    else:
        m = tl.max(x, axis=0)
        num = tl.exp(x - m)
        p = num / tl.sum(num, axis=0)
    slots = tl.arange(0, K_PAD)
    top = tl.zeros([K_PAD], tl.float32)
    picked = tl.zeros([K_PAD], tl.int32)
    for j in tl.static_range(K):  # K arg-maxes: a handful over at most a few hundred experts
        best = tl.max(p, axis=0)
        at = tl.min(tl.where(p == best, e, E_PAD), axis=0)
        top = tl.where(slots == j, best, top)
        picked = tl.where(slots == j, at, picked)
        p = tl.where(e == at, float("-inf"), p)
    ok = slots < K
    if SOFTMAX_AFTER:  # the logits (in their dtype) softmaxed in fp32
        m = tl.max(tl.where(ok, top, float("-inf")), axis=0)
        num = tl.where(ok, tl.exp(top - m), 0.0)
        top = num / tl.sum(num, axis=0)
    elif NORMALIZE:
        top = top / tl.sum(tl.where(ok, top, 0.0), axis=0)
    return top, picked, ok


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, chosen_ptr, E, K: tl.constexpr, E_PAD: tl.constexpr,
                       K_PAD: tl.constexpr, SOFTMAX_AFTER: tl.constexpr, NORMALIZE: tl.constexpr,
                       PDL: tl.constexpr):
    """One row of logits: its top K (_top_k)."""
    _pdl_start(PDL)
    row = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + row * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    top, picked, ok = _top_k(x, e, E_PAD, K, K_PAD, SOFTMAX_AFTER, NORMALIZE)
    slots = tl.arange(0, K_PAD)
    tl.store(weights_ptr + row * K + slots, top.to(weights_ptr.dtype.element_ty), mask=ok)
    tl.store(chosen_ptr + row * K + slots, picked, mask=ok)


def route_topk(logits: torch.Tensor, top_k: int, softmax_after: bool, normalize: bool,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """engine/forward.route's weights (in `dtype`) and experts (int32), [rows, top_k] each, from
    the router's logits [rows, experts] (as F.linear rounds them)."""
    rows, experts = logits.shape
    weights = torch.empty((rows, top_k), dtype=dtype, device=logits.device)
    chosen = torch.empty((rows, top_k), dtype=torch.int32, device=logits.device)
    if rows:
        pdl = pdl_available(logits.device)
        _route_topk_kernel[(rows,)](logits, weights, chosen, experts, K=top_k, E_PAD=triton.next_power_of_2(experts),
                                    K_PAD=triton.next_power_of_2(top_k), SOFTMAX_AFTER=softmax_after,
                                    NORMALIZE=normalize, PDL=pdl, num_warps=1, launch_pdl=pdl)
    return weights, chosen


@triton.jit
def _router_kernel(h_ptr, w_ptr, bias_ptr, logits_ptr, tickets_ptr, weights_ptr, chosen_ptr, E, HIDDEN,
                   K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX_AFTER: tl.constexpr,
                   NORMALIZE: tl.constexpr, PDL: tl.constexpr):
    """The router of one row: program (row, j) computes the logits of experts j * BLOCK_E ..,
    rounded to h's dtype as F.linear rounds them; the row's last program to finish (a ticket
    per row, reset by it for the next launch) reads them all back and takes the top K."""
    _pdl_start(PDL)
    row = tl.program_id(0)
    block = tl.program_id(1)
    experts = block * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < E
    logits = tl.zeros([BLOCK_E], tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):  # Qwen3-MoE's 2,048: one step, its loads in flight together
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        x = tl.load(h_ptr + row * HIDDEN + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + experts[:, None] * HIDDEN + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        logits += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + experts, mask=e_ok, other=0.0).to(tl.float32)
    logits = logits.to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(logits_ptr + row * E + experts, logits, mask=e_ok)
    # the ticket's release orders the stores above before it; the last program's acquire sees them
    if tl.atomic_add(tickets_ptr + row, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        e = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + row * E + e, mask=e < E, other=float("-inf"), volatile=True)
        top, picked, ok = _top_k(x, e, E_PAD, K, K_PAD, SOFTMAX_AFTER, NORMALIZE)
        slots = tl.arange(0, K_PAD)
        tl.store(weights_ptr + row * K + slots, top.to(weights_ptr.dtype.element_ty), mask=ok)
        tl.store(chosen_ptr + row * K + slots, picked, mask=ok)
        tl.store(tickets_ptr + row, 0)


class Router:
    """A MoE layer's router for decode-size passes: the logits (h @ router^T + bias) and their top
    k in one launch, route_topk's results from h instead of from F.linear's logits (whose cuBLAS
    GEMV took 5 µs a layer on an H100 for Qwen3-30B-A3B's 128 x 2,048 router, more than the
    rest of the routing). Graph-safe: the per-row tickets live here, zero between launches."""

    # experts per program: Qwen3-MoE's 128 in 64 programs of 2 warps, each reading 8 KB at once
    # (4 experts in 4 warps, looping over K, took 7.5 µs a layer on an H100: the loop's loads
    # one after another, and the top k's reductions across 4 warps)
    BLOCK_E = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> None:
        self.weight, self.bias = weight, bias
        self.tickets = torch.zeros(max_rows, dtype=torch.int32, device=weight.device)

    def __call__(self, h: torch.Tensor, top_k: int, softmax_after: bool, normalize: bool,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        rows, hidden = h.shape
        experts = self.weight.shape[0]
        if rows > self.tickets.numel():
            raise ValueError(f"the router takes up to {self.tickets.numel()} rows a launch, not {rows}")
        weights = torch.empty((rows, top_k), dtype=dtype, device=h.device)
        chosen = torch.empty((rows, top_k), dtype=torch.int32, device=h.device)
        logits = torch.empty((rows, experts), dtype=torch.float32, device=h.device)
        if rows:
            pdl = pdl_available(h.device)
            _router_kernel[(rows, triton.cdiv(experts, self.BLOCK_E))](
                h.contiguous(), self.weight, self.bias if self.bias is not None else self.weight, logits, self.tickets, weights,
                chosen, experts, hidden, K=top_k, E_PAD=triton.next_power_of_2(experts),
                K_PAD=triton.next_power_of_2(top_k), BLOCK_E=self.BLOCK_E,
                BLOCK_K=min(2048, triton.next_power_of_2(hidden)), HAS_BIAS=self.bias is not None,
                SOFTMAX_AFTER=softmax_after, NORMALIZE=normalize, PDL=pdl, num_warps=2, launch_pdl=pdl)
        return weights, chosen


@triton.jit
def _weighted_sum_kernel(y_ptr, weights_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[row, d] = sum over j < K of y[row * K + j, d] * weights[row, j], in fp32, j in order."""
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < D
    tl.store(out_ptr + row * D + offs, _routed_sum(y_ptr, weights_ptr, row, offs, ok, D, K, BLOCK), mask=ok)


def weighted_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A MoE layer's combine: the (token, expert) pairs' outputs y [rows * top_k, D] summed per
    token by the routing weights [rows, top_k], [rows, D] fp32, in one launch (the product, the
    cast and the reduction PyTorch would launch apart: 3 of a Qwen3-30B-A3B step's 48 layers'
    kernels each)."""
    rows, top_k = weights.shape
    d = y.shape[-1]
    out = torch.empty((rows, d), dtype=torch.float32, device=y.device)
    if rows:
        pdl = pdl_available(y.device)
        block = min(1024, triton.next_power_of_2(d))
        _weighted_sum_kernel[(rows, triton.cdiv(d, block))](y.contiguous(), weights.contiguous(), out, d, K=top_k,
                                                            BLOCK=block, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


# ---- prefix copies ----------------------------------------------------------------------

# `span` is not specialized (nor are the slots, read from `slot_ptr`: the source, then the
# targets), so one compile, at load (FastForward.capture_all), serves every copy.
@triton.jit(do_not_specialize=["span"])
def _copy_prefix_kernel(cache_ptr, slot_ptr, span, stride_slot, stride_head, BLOCK: tl.constexpr):
    source = tl.load(slot_ptr).to(tl.int64)
    target = tl.load(slot_ptr + 1 + tl.program_id(0)).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < span
    values = tl.load(cache_ptr + source * stride_slot + head * stride_head + offs, mask=ok)
    tl.store(cache_ptr + target * stride_slot + head * stride_head + offs, values, mask=ok)


def copy_prefix(caches: list[torch.Tensor], source: int, targets: list[int], length: int) -> None:
    """attention.copy_slot_prefix in one launch per cache: the first `length` positions of slot
    `source` into each of `targets` in [slots, kv_heads, ctx, head_dim] caches (each head's
    positions are one contiguous run). PyTorch's broadcast index_put took 300 us a cache for 31
    targets of a 2,000-token prefix on an H200 (19 ms of a 32-request burst); a plain copy moves
    as many bytes a few times faster."""
    if not caches or not targets or length <= 0:
        return
    index = torch.tensor([source, *targets], dtype=torch.int32).to(caches[0].device, non_blocking=True)
    block = 4096
    for cache in caches:
        assert cache.is_contiguous()
        span = length * cache.shape[3]
        grid = (len(targets), cache.shape[1], triton.cdiv(span, block))
        _copy_prefix_kernel[grid](cache, index, span, cache.stride(0), cache.stride(1), BLOCK=block, num_warps=4)
