"""The quantized matrix products of the decode step, as Triton kernels over bitsandbytes' weights.

- nf4_matmul: y = x W^T with W in bitsandbytes' 4-bit layout (NF4 or FP4; the 16 codes
  relabeled once at load, see nf4_decode): packed nibbles (high nibble first, row-major), one
  absmax per 64 weights, double-quantized absmax (uint8 codes, a float per 256 blocks, an
  offset) decoded in the kernel. A GEMV for 1-4 rows: each warp reads long runs of one weight
  row in 16-byte loads (whole DRAM pages, not 32 bytes of many rows), the nibbles are decoded
  in registers by byte permutes (no lookup in memory), bf16 pairs multiplied in packed bf16
  and summed in fp32, split-K, the next block's loads in flight while one is decoded; RoPE +
  KV write, or SiLU * up, in its epilogue. More rows dequantize, then one GEMM.
- int8_matmul: the same for bitsandbytes' int8 weights (int8 rows and an absmax per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from daemon.engine.cuda import nf4_decode
from daemon.engine.cuda.kernels import activation, pdl_available, rotate_and_store

# The NF4 GEMV is launched without PDL: launched early (its weight loads issued, then waiting),
# it slowed the whole step on an H100 (258 against 287 tok/s). Nor does it let the kernel after it
# launch early (a trigger alone, that kernel waiting for the whole GEMV): on an H200 the trigger
# cost NF4+DQ 352.9 -> 351.3, NF4 370.0 -> 367.6, int8 302.5 -> 301.6 tok/s
# (bench/gpu_decode.py --ablate gemv-trigger turns it on to measure it again).
GEMV_TRIGGERS_NEXT = False


# ---- NF4 ---------------------------------------------------------------------------------

@triton.jit
def _mul_add(a, b, c):
    """a * b + c rounded twice, never fused into one FMA: bitsandbytes decodes double-quantized
    absmax in two steps (the product in one kernel, the offset added after), and an FMA rounds
    differently now and then (a dequantized weight one bf16 step off)."""
    return libdevice.add_rn(libdevice.mul_rn(a, b), c)


@triton.jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, DOUBLE: tl.constexpr):
    if DOUBLE:  # bitsandbytes' double quantization, decoded exactly as it decodes it
        q = tl.load(absmax_ptr + blk).to(tl.int32)
        value = _mul_add(tl.load(code2_ptr + q), tl.load(absmax2_ptr + blk // 256), tl.load(offset_ptr + blk // 256))
    else:
        value = tl.load(absmax_ptr + blk).to(tl.float32)
    return value


# Decoding 8 NF4 weights (one int32 word) without memory lookups: byte permutes over tables
# held in registers (nf4_decode says how, and CI checks that PTX on the CPU); the weights are
# relabeled at load so that the tables need no masks.
_PAIRS_ASM = tl.constexpr(nf4_decode.PAIRS_ASM)
_DECODE_ASM = tl.constexpr(nf4_decode.DECODE_ASM)
# Four bf16-pair products summed in bf16 (as bitsandbytes' own GEMV multiplies in bf16),
# then the two halves added in fp32.
_DOT4_ASM = tl.constexpr("""{
.reg .b32 acc, lo, z;
mov.b32 z, 0;
fma.rn.bf16x2 acc, $1, $5, z;
fma.rn.bf16x2 acc, $2, $6, acc;
fma.rn.bf16x2 acc, $3, $7, acc;
fma.rn.bf16x2 acc, $4, $8, acc;
shl.b32 lo, acc, 16;
and.b32 acc, acc, 0xFFFF0000;
add.f32 $0, lo, acc;
}""")


@triton.jit
def _nf4_pairs(words, t0, t1, t2, t3, t4, t5, t6, t7):
    z = tl.zeros(words.shape, tl.int32)
    p0, p1, p2, p3 = tl.inline_asm_elementwise(
        _PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [words, z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return p0, p1, p2, p3


@triton.jit
def _dot4(p0, p1, p2, p3, xb, GROUPS: tl.constexpr, X_VEC: tl.constexpr):
    """per word: sum over its 8 weights of w * x, from the bf16 pairs and the word's inputs
    read as 4 int32 (bf16 pairs) at xb [G, 8] + [0, 4): one 16-byte load into the four
    registers (X_VEC; xb 16-byte aligned), or four loads."""
    if X_VEC:  # one 16-byte load per word, straight into the four registers
        x0, x1, x2, x3 = tl.inline_asm_elementwise(
            "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [xb.to(tl.int64, bitcast=True)],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        x0 = tl.load(xb)
        x1 = tl.load(xb + 1)
        x2 = tl.load(xb + 2)
        x3 = tl.load(xb + 3)
    z = tl.zeros(p0.shape, tl.int32)
    return tl.inline_asm_elementwise(_DOT4_ASM, "=f,r,r,r,r,r,r,r,r",
                                     [p0, p1, p2, p3, z + x0[None, :, :], z + x1[None, :, :], z + x2[None, :, :],
                                      z + x3[None, :, :]], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _nf4_decode8(words, t0, t1, t2, t3, t4, t5, t6, t7):
    """int32 words [..] -> the 8 weights of each word as fp32 (weight i of the word: v_i;
    bitsandbytes puts weight 2b in the high nibble of byte b)."""
    z = tl.zeros(words.shape, tl.int32)
    v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
        _DECODE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
        [words, z + t0, z + t1, z + t2, z + t3, z + t4, z + t5, z + t6, z + t7],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)
    return (v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True), v2.to(tl.float32, bitcast=True),
            v3.to(tl.float32, bitcast=True), v4.to(tl.float32, bitcast=True), v5.to(tl.float32, bitcast=True),
            v6.to(tl.float32, bitcast=True), v7.to(tl.float32, bitcast=True))


@triton.jit
def _dot8(v0, v1, v2, v3, v4, v5, v6, v7, xb, GROUPS: tl.constexpr, X_VEC: tl.constexpr):
    """sum_i v_i * x_i over the 8 weights of each word [.., G, 8]; xb [G, 8] points at each
    word's first input. X_VEC: the 8 inputs of a word are read as one 16-byte vector and
    split in registers; else each x_i is a strided read."""
    if X_VEC:
        xv = tl.load(xb[:, :, None] + tl.arange(0, 8)[None, None, :]).to(tl.float32)
        xe, xo = tl.split(tl.reshape(xv, (GROUPS, 8, 4, 2)))
        x0, x2 = tl.split(tl.reshape(xe, (GROUPS, 8, 2, 2)))
        x0, x4 = tl.split(x0)
        x2, x6 = tl.split(x2)
        x1, x3 = tl.split(tl.reshape(xo, (GROUPS, 8, 2, 2)))
        x1, x5 = tl.split(x1)
        x3, x7 = tl.split(x3)
    else:
        x0 = tl.load(xb).to(tl.float32)
        x1 = tl.load(xb + 1).to(tl.float32)
        x2 = tl.load(xb + 2).to(tl.float32)
        x3 = tl.load(xb + 3).to(tl.float32)
        x4 = tl.load(xb + 4).to(tl.float32)
        x5 = tl.load(xb + 5).to(tl.float32)
        x6 = tl.load(xb + 6).to(tl.float32)
        x7 = tl.load(xb + 7).to(tl.float32)
    part = v0 * x0[None, :, :]
    part += v1 * x1[None, :, :]
    part += v2 * x2[None, :, :]
    part += v3 * x3[None, :, :]
    part += v4 * x4[None, :, :]
    part += v5 * x5[None, :, :]
    part += v6 * x6[None, :, :]
    part += v7 * x7[None, :, :]
    return part


@triton.jit
def _load_block(w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, rows, row_ok, K, k0,
                DOUBLE: tl.constexpr, EVEN_N: tl.constexpr, GROUPS: tl.constexpr):
    """The packed words [BLOCK_N, GROUPS, 8] of rows x [k0, k0 + 64 GROUPS) (a 64-weight block
    is 8 contiguous words, read 16 bytes at a time) and what their absmax is made of, as read
    from memory: `_block_absmax` finishes it, so that a prefetch never waits on a load."""
    g = tl.arange(0, GROUPS)
    kw = tl.multiple_of(K // 8, 8)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    # shifts, not //: the indices are never negative, and a signed division costs a fix-up.
    # The words are read as rows of GROUPS * 8 contiguous words, then viewed as [.., GROUPS, 8]:
    # so a warp reads long runs of one row (whole DRAM pages), not 32 bytes of each of 16 rows
    at = rows[:, None] * kw + ((k0 >> 3) + tl.arange(0, GROUPS * 8))[None, :]
    at = tl.max_contiguous(tl.multiple_of(at, [1, 8]), [1, GROUPS * 8])
    blk = rows[:, None] * (K >> 6) + ((k0 >> 6) + g)[None, :]
    if EVEN_N:
        words = tl.load(w32 + at)
    else:
        words = tl.load(w32 + at, mask=row_ok[:, None], other=0)
        blk = tl.where(row_ok[:, None], blk, 0)
    words = tl.reshape(words, (rows.shape[0], GROUPS, 8))
    if DOUBLE:  # bitsandbytes' double quantization: an 8-bit code, a scale and an offset per 256 blocks
        raw = _ldg_u8(absmax_ptr + blk)
        scale = _ldg_f32(absmax2_ptr + (blk >> 8))
        shift = _ldg_f32(offset_ptr + (blk >> 8))
    else:
        raw = _ldg_f32(absmax_ptr.to(tl.pointer_type(tl.float32)) + blk)
        scale = raw
        shift = raw
    return words, raw, scale, shift


# The absmax parts are read by inline loads, which take the layout of their addresses: plain
# loads get a layout of their own (coalesced along the blocks) and a conversion through shared
# memory, with barriers, in every iteration of the GEMV's loop.
@triton.jit
def _ldg_u8(ptr):
    return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _ldg_f32(ptr):
    return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptr.to(tl.int64, bitcast=True)],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _block_absmax(code2_ptr, raw, scale, shift, DOUBLE: tl.constexpr):
    """[BLOCK_N, GROUPS, 1] absmax, decoded exactly as bitsandbytes decodes it."""
    if DOUBLE:
        value = _mul_add(_ldg_f32(code2_ptr + raw), scale, shift)
    else:
        value = raw
    return value[:, :, None]


@triton.jit
def _nf4_gemv_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, bias_ptr, out_ptr, offset_ptr, tables_ptr,
                     N, K, K_SPLIT, stride_xm, stride_om,
                     cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX, expert_ptr,
                     M: tl.constexpr, DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                     EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, X_VEC: tl.constexpr,
                     PACKED: tl.constexpr, PREFETCH: tl.constexpr, SILU: tl.constexpr, GELU: tl.constexpr,
                     ROPE: tl.constexpr, HEAD_D: tl.constexpr, PDL: tl.constexpr, ROUTED: tl.constexpr = False,
                     PAIRS_PER_X: tl.constexpr = 1):
    """Decode-size products (M <= 4 rows). Weights are read as int32 words (8 nibbles) and
    decoded in registers; absmax applies per 64 weights; a program covers BLOCK_N outputs
    over K_SPLIT inputs, and split programs add their sums atomically into an fp32 output.
    Epilogues (no split: the sums are final in one program):
    - SILU: W is [gate; up], a program takes BLOCK_N / 2 rows of each and stores
      act(gate) * up (SiLU, or GELU-tanh with GELU), in out's dtype, as gated_act computes it;
    - ROPE: W is [q; k; v] (H, KV, KV heads of HEAD_D), a program takes BLOCK_N / 2 dims of
      one head and the ones half a head further (RoPE's pairs), and does what the RoPE kernel
      does: rotated q into out [M, H, HEAD_D], rotated k and v into the caches at each row's
      slot and position.
    ROUTED (a MoE layer's experts, M = 1): W stacks the experts' matrices of N rows each, and
    program axis 2 is one (token, expert) pair: x's row pair // PAIRS_PER_X times the rows of
    expert expert_ptr[pair], into out's row `pair`."""
    if PDL:  # the next kernel may launch (it waits for this one's results)
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # the byte tables, read per lane from 32 copies: values ptxas cannot prove uniform stay in
    # vector registers through the loop, instead of being copied from uniform registers before
    # every byte permute (40 of the loop's 220 instructions)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [pid_n], dtype=tl.int32, is_pure=True, pack=1)
    tables = tables_ptr + lane * 8
    t0 = tl.load(tables)
    t1 = tl.load(tables + 1)
    t2 = tl.load(tables + 2)
    t3 = tl.load(tables + 3)
    t4 = tl.load(tables + 4)
    t5 = tl.load(tables + 5)
    t6 = tl.load(tables + 6)
    t7 = tl.load(tables + 7)
    rows, row_ok, head, first = _gemv_rows(pid_n, N, BLOCK_N, SILU, ROPE, HEAD_D)
    if ROUTED:
        pair = tl.program_id(2)
        x_ptr += (pair // PAIRS_PER_X) * stride_xm
        out_ptr += pair * stride_om
        w_rows = rows + tl.load(expert_ptr + pair) * N
    else:
        w_rows = rows
    x_at = (tl.arange(0, GROUPS) * 64)[:, None] + (tl.arange(0, 8) * 8)[None, :]
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    k_begin = pid_k * K_SPLIT
    acc0 = tl.zeros([BLOCK_N, GROUPS, 8], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, GROUPS, 8], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, GROUPS, 8], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, GROUPS, 8], dtype=tl.float32)
    step: tl.constexpr = GROUPS * 64
    k_last = k_begin + K_SPLIT - step
    if PREFETCH:  # the next block's loads are in flight while this one is decoded
        words, raw, scale, shift = _load_block(w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, w_rows, row_ok, K,
                                               k_begin, DOUBLE, EVEN_N, GROUPS)
    # no software pipelining by Triton: staging the loads through shared memory (cp.async) measured
    # no faster on an H200 than the register prefetch
    for k0 in tl.range(k_begin, k_begin + K_SPLIT, step, num_stages=1):
        if PREFETCH:
            n_words, n_raw, n_scale, n_shift = _load_block(w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, w_rows, row_ok,
                                                           K, tl.minimum(k0 + step, k_last), DOUBLE, EVEN_N, GROUPS)
        else:
            words, raw, scale, shift = _load_block(w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, w_rows, row_ok, K, k0,
                                                   DOUBLE, EVEN_N, GROUPS)
        am = _block_absmax(code2_ptr, raw, scale, shift, DOUBLE)
        if PACKED:
            p0, p1, p2, p3 = _nf4_pairs(words, t0, t1, t2, t3, t4, t5, t6, t7)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _nf4_decode8(words, t0, t1, t2, t3, t4, t5, t6, t7)
        for r in tl.static_range(M):
            if PACKED:
                part = _dot4(p0, p1, p2, p3, x32 + ((r * stride_xm + k0) >> 1) + (x_at >> 1), GROUPS, X_VEC)
            else:
                part = _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr + r * stride_xm + k0 + x_at, GROUPS, X_VEC)
            if r == 0:
                acc0 += part * am
            elif r == 1:
                acc1 += part * am
            elif r == 2:
                acc2 += part * am
            else:
                acc3 += part * am
        if PREFETCH:
            words, raw, scale, shift = n_words, n_raw, n_scale, n_shift
    for r in tl.static_range(M):
        if r == 0:
            y = tl.sum(tl.sum(acc0, axis=2), axis=1)
        elif r == 1:
            y = tl.sum(tl.sum(acc1, axis=2), axis=1)
        elif r == 2:
            y = tl.sum(tl.sum(acc2, axis=2), axis=1)
        else:
            y = tl.sum(tl.sum(acc3, axis=2), axis=1)
        _gemv_epilogue(y, r, rows, row_ok, pid_n, pid_k, head, first, out_ptr, stride_om, bias_ptr, N, cos_ptr,
                       sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX, HAS_BIAS, ATOMIC, SILU, GELU,
                       ROPE, BLOCK_N, HEAD_D)


@triton.jit
def _gemv_rows(pid_n, N, BLOCK_N: tl.constexpr, SILU: tl.constexpr, ROPE: tl.constexpr, HEAD_D: tl.constexpr):
    """The output rows of a GEMV program: BLOCK_N in a run; for SILU, BLOCK_N / 2 gate rows and
    the up rows N / 2 further; for ROPE, BLOCK_N / 2 dims of one head (head, from dim `first`)
    and the ones half a head further."""
    HALF: tl.constexpr = BLOCK_N // 2
    PER_HEAD: tl.constexpr = HEAD_D // BLOCK_N  # ROPE: programs per head
    head = pid_n // PER_HEAD
    first = (pid_n % PER_HEAD) * HALF
    if SILU:
        i = tl.arange(0, BLOCK_N)
        cols = pid_n * HALF + i % HALF
        rows = cols + (i // HALF) * (N >> 1)
        row_ok = cols < (N >> 1)
    elif ROPE:
        i = tl.arange(0, BLOCK_N)
        rows = head * HEAD_D + first + i % HALF + (i // HALF) * (HEAD_D // 2)
        row_ok = rows < N
    else:
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
    return rows, row_ok, head, first


@triton.jit
def _gemv_epilogue(y, r, rows, row_ok, pid_n, pid_k, head, first, out_ptr, stride_om, bias_ptr, N, cos_ptr, sin_ptr,
                   pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX, HAS_BIAS: tl.constexpr,
                   ATOMIC: tl.constexpr, SILU: tl.constexpr, GELU: tl.constexpr, ROPE: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    """Row r's sums y [BLOCK_N] of a GEMV program (its rows from _gemv_rows): + bias, then stored,
    added (split-K), or through the SiLU or RoPE epilogue."""
    HALF: tl.constexpr = BLOCK_N // 2
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if SILU:
        gate, up = tl.split(tl.permute(tl.reshape(y, (2, HALF)), (1, 0)))
        act = activation(gate, GELU).to(out_ptr.dtype.element_ty).to(tl.float32)
        cols = pid_n * HALF + tl.arange(0, HALF)
        tl.store(out_ptr + r * stride_om + cols, (act * up).to(out_ptr.dtype.element_ty), mask=cols < (N >> 1))
    elif ROPE:
        _rope_epilogue(y, r, head, first, out_ptr + r * stride_om, cos_ptr, sin_ptr, pos_ptr, slot_ptr,
                       k_cache_ptr, v_cache_ptr, H, KV, CTX, HALF, HEAD_D)
    elif ATOMIC:
        tl.atomic_add(out_ptr + r * stride_om + rows, y, mask=row_ok, sem="relaxed")
    else:
        tl.store(out_ptr + r * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _rope_epilogue(y, r, head, first, q_row_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                   H, KV, CTX, HALF: tl.constexpr, HEAD_D: tl.constexpr):
    """Row r's sums y of dims first.. and HEAD_D / 2 + first.. of one head, rotated and stored
    as the RoPE kernel does it."""
    x1, x2 = tl.split(tl.permute(tl.reshape(y, (2, HALF)), (1, 0)))
    rotate_and_store(x1, x2, first + tl.arange(0, HALF), head, tl.load(pos_ptr + r), slot_ptr + r,
                     q_row_ptr + head * HEAD_D, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX, HEAD_D)


# Launch settings per (path, N, K[, rows]), measured by bench/nf4_kernel.py on the card.
GEMV_CONFIGS: dict[tuple, tuple] = {
    # bench/nf4_kernel.py --rows 1 2 4 --int8 on an H200 (2026-12-01), Llama-3-8B shapes, per
    # (path, N, K[, rows]): NF4 ("gemv") (BLOCK_N, BLOCK_K, warps, split-K, x as vectors, packed
    # bf16, prefetch), int8 (BLOCK_N, BLOCK_K, warps, split-K); 3 rows take the 4-row settings.
    # On [q; k; v] and [gate; up] a split-K setting wins only by more than the RoPE / SiLU kernel
    # it cannot fuse (qkv at 4 rows: 16.0 + 1.8 µs against 17.0; int8 gate_up at 2: 44.8 + 1.5
    # against 44.9)
    ('gemv', 6144, 4096): (16, 1024, 8, 1, True, True, True),
    ('gemv', 6144, 4096, 2): (16, 1024, 4, 1, True, True, True),
    ('gemv', 6144, 4096, 4): (16, 1024, 4, 1, True, True, True),
    ('gemv', 4096, 4096): (16, 2048, 8, 1, True, True, True),
    ('gemv', 4096, 4096, 2): (16, 1024, 8, 1, True, True, True),
    ('gemv', 4096, 4096, 4): (32, 1024, 8, 1, True, True, True),
    ('gemv', 28672, 4096): (16, 1024, 4, 1, True, True, True),
    ('gemv', 28672, 4096, 2): (32, 512, 4, 1, True, True, True),
    ('gemv', 28672, 4096, 4): (32, 512, 4, 1, True, True, True),
    ('gemv', 4096, 14336): (16, 2048, 8, 1, True, True, True),
    ('gemv', 4096, 14336, 2): (16, 1024, 4, 2, True, True, True),
    ('gemv', 4096, 14336, 4): (16, 2048, 8, 1, True, True, True),
    # gemma-3-12b's products (bench/nf4_kernel.py --models gemma3-12b --rows 1, the same H200 kind,
    # 2026-12-02); other matrices never swept take the closest swept one's settings (_config)
    ('gemv', 8192, 3840): (16, 2048, 8, 1, True, True, True),
    ('gemv', 3840, 4096): (16, 2048, 8, 1, True, True, True),
    ('gemv', 30720, 3840): (64, 512, 4, 1, True, True, True),
    ('gemv', 3840, 15360): (16, 1024, 8, 1, True, True, True),
    # the MoE experts' routed GEMVs (bench/nf4_kernel.py --routed on an H100, 2026-12-07), per
    # (rows per expert, K, pairs): Qwen3-30B-A3B's and gpt-oss-20b's at 1 and 8 tokens; against
    # the dense shapes' settings they took before, 9.8 / 6.7 µs for 11.9 / 9.0 (Qwen3, one
    # token) and 24.4 / 13.9 for 53.9 / 30.8 (gpt-oss)
    ('routed', 1536, 2048, 8): (32, 512, 8, 1, True, True, True),
    ('routed', 1536, 2048, 64): (32, 512, 4, 1, True, True, True),
    ('routed', 2048, 768, 8): (32, 512, 4, 1, True, True, True),
    ('routed', 2048, 768, 64): (64, 512, 4, 1, True, True, True),
    ('routed', 5760, 2880, 4): (64, 512, 4, 4, True, True, True),
    ('routed', 5760, 2880, 32): (64, 512, 4, 8, True, True, True),
    ('routed', 2880, 2880, 4): (64, 512, 4, 8, True, True, True),
    ('routed', 2880, 2880, 32): (64, 512, 4, 8, True, True, True),
    ('int8', 6144, 4096): (16, 1024, 8, 1),
    ('int8', 6144, 4096, 2): (16, 1024, 4, 1),
    ('int8', 6144, 4096, 4): (16, 512, 4, 2),
    ('int8', 4096, 4096): (16, 1024, 8, 1),
    ('int8', 4096, 4096, 2): (16, 1024, 8, 1),
    ('int8', 4096, 4096, 4): (16, 1024, 4, 1),
    ('int8', 28672, 4096): (16, 512, 4, 1),
    ('int8', 28672, 4096, 2): (16, 1024, 4, 1),
    ('int8', 28672, 4096, 4): (16, 1024, 4, 1),
    ('int8', 4096, 14336): (16, 1024, 4, 2),
    ('int8', 4096, 14336, 2): (16, 512, 4, 2),
    ('int8', 4096, 14336, 4): (16, 1024, 4, 2),
    # the batched products (batched.py), bench/batched_kernel.py on an H200 (2026-12-05), Llama-3-8B
    # shapes, per (path, N, K, BLOCK_M): NF4 ("mm") and int8 ("mm8") (BLOCK_N, BLOCK_K, warps,
    # split-K, stages)
    ('mm', 6144, 4096, 16): (64, 128, 4, 4, 3),
    ('mm', 6144, 4096, 32): (64, 128, 4, 4, 3),
    ('mm', 6144, 4096, 64): (64, 128, 4, 4, 3),
    ('mm', 4096, 4096, 16): (64, 256, 4, 4, 3),
    ('mm', 4096, 4096, 32): (64, 256, 4, 4, 3),
    ('mm', 4096, 4096, 64): (64, 128, 4, 4, 3),
    ('mm', 28672, 4096, 16): (64, 128, 4, 4, 3),
    ('mm', 28672, 4096, 32): (64, 128, 4, 2, 3),
    ('mm', 28672, 4096, 64): (128, 128, 8, 1, 3),
    ('mm', 4096, 14336, 16): (64, 256, 4, 4, 3),
    ('mm', 4096, 14336, 32): (64, 256, 4, 4, 3),
    ('mm', 4096, 14336, 64): (128, 256, 8, 4, 3),
    ('mm8', 6144, 4096, 16): (64, 128, 4, 4, 3),
    ('mm8', 6144, 4096, 32): (64, 128, 4, 4, 3),
    ('mm8', 6144, 4096, 64): (64, 128, 4, 4, 3),
    ('mm8', 4096, 4096, 16): (64, 128, 4, 4, 3),
    ('mm8', 4096, 4096, 32): (64, 128, 4, 4, 3),
    ('mm8', 4096, 4096, 64): (64, 128, 4, 4, 3),
    ('mm8', 28672, 4096, 16): (64, 128, 4, 2, 3),
    ('mm8', 28672, 4096, 32): (64, 128, 4, 2, 3),
    ('mm8', 28672, 4096, 64): (128, 64, 4, 4, 3),
    ('mm8', 4096, 14336, 16): (64, 128, 4, 4, 3),
    ('mm8', 4096, 14336, 32): (64, 128, 4, 4, 3),
    ('mm8', 4096, 14336, 64): (64, 128, 4, 4, 3),
}


class NF4Weights:
    """One or more bitsandbytes Linear4bit layers fused along the output dimension, kept in
    bitsandbytes' 4-bit layout with the 16 codes relabeled (nf4_decode); NF4, or FP4, which is
    the same layout with another code. Double-quantized absmax stays 8-bit; each 256-block group
    carries its module's offset, so fused modules decode exactly as bitsandbytes decodes
    them one by one."""

    @staticmethod
    def unsupported(modules: list) -> str | None:
        """Why these layers cannot be fused and read by the kernels (None: they can)."""
        states = [m.weight.quant_state for m in modules]
        k = int(states[0].shape[1])
        if (any(st.blocksize != 64 or st.quant_type != states[0].quant_type or int(st.shape[1]) != k for st in states)
                or k % 64):
            return "the fused kernel reads one 4-bit code with blocksize 64 and rows of whole blocks"
        try:
            nf4_decode.decoding_for(states[0].code.float().tolist())
        except ValueError as exc:
            return str(exc)
        return None

    def __init__(self, modules: list) -> None:
        reason = self.unsupported(modules)
        if reason:
            raise ValueError(reason)
        states = [m.weight.quant_state for m in modules]
        self.k = int(states[0].shape[1])
        self.n = sum(int(st.shape[0]) for st in states)
        # the kernels read the codes relabeled (nf4_decode): the packed weights and the code
        # table are relabeled alike, so every weight decodes to bitsandbytes' value
        decoding = nf4_decode.decoding_for(states[0].code.float().tolist())
        device = states[0].code.device
        self.code = torch.tensor(decoding.code, dtype=torch.float32, device=device)
        # one copy of the byte tables per lane: see _nf4_gemv_kernel
        self.tables = torch.tensor([decoding.tables] * 32, dtype=torch.int32, device=device)
        self.packed = decoding.relabel(torch.cat([m.weight.data.reshape(-1) for m in modules]))
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
        self.bias = _fused_bias(modules)

    @property
    def double(self) -> bool:
        return self.absmax2 is not None

    def matmul(self, x: torch.Tensor, **kw) -> torch.Tensor:
        return nf4_matmul(x, self, **kw)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return nf4_dequantize(self, out)

    def gemv_setting(self, rows: int, routed: "Routed | None" = None) -> tuple[int, int]:
        """(BLOCK_N, split-K) of the GEMV for this many rows (or a routed product). An epilogue
        needs split-K 1 (the sums final in one program), RoPE's also a BLOCK_N that divides the
        head size."""
        config = _gemv_config(self.n, self.k, rows, routed)
        return config[0], _gemv_split(config[3], self.k, 64)

    @property
    def nbytes(self) -> int:
        parts = [self.packed, self.absmax, self.absmax2, self.offset, self.bias]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _fused_bias(modules: list) -> torch.Tensor | None:
    """The fused layers' biases end to end (None unless every layer has one)."""
    biases = [m.bias for m in modules]
    return torch.cat([b.detach() for b in biases]).contiguous() if all(b is not None for b in biases) else None


def _plain_absmax(state) -> torch.Tensor:
    if state.state2 is None:
        return state.absmax.float().reshape(-1)
    s2 = state.state2
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[:state.absmax.numel()]
    return s2.code.float()[state.absmax.long()] * scale + float(state.offset)


def _fit_block_k(block_k: int, k: int, smallest: int) -> int:
    """The largest of block_k, block_k/2, ... (>= smallest) that divides K: the loop has no tail."""
    while block_k > smallest and (k % block_k or block_k > k):
        block_k //= 2
    return block_k


# BLOCK_N, BLOCK_K, warps, split-K, x as vectors, packed bf16, prefetch
GEMV_DEFAULT = (32, 256, 4, 4, True, True, True)


def _config(path: str, n: int, k: int, m: int, default: tuple) -> tuple:
    """The setting for m rows: m's own, 4 rows' for 3, the one-row setting; for a matrix never
    swept, the setting of the swept matrix closest in shape (another family's widths are near
    Llama's, and a swept setting fits them better than one guess for all); else the default."""
    rows_keys = (m, 4) if m == 3 else (m,)
    for key in [(path, n, k, rows) for rows in rows_keys] + [(path, n, k)]:
        if key in GEMV_CONFIGS:
            return GEMV_CONFIGS[key]
    swept = {(key[1], key[2]) for key in GEMV_CONFIGS if key[0] == path}
    if not swept:
        return default
    near = min(swept, key=lambda nk: (abs(math.log(nk[0] / n)) + abs(math.log(nk[1] / k)), nk))
    return _config(path, *near, m, default)


def _gemv_config(n: int, k: int, m: int, routed: "Routed | None" = None) -> tuple:
    """The NF4 GEMV's setting. A routed product (rows per expert, K, pairs) takes its own sweep's
    ("routed" keys, bench/nf4_kernel.py --routed: its grid has a program per pair, each reading a
    small matrix, and wants other settings than a dense matrix of its size), the swept pair count
    closest to its own, else the setting of the dense matrix of its shape."""
    if routed is not None:
        n, pairs = routed.rows, routed.experts.numel()
        swept = [key[3] for key in GEMV_CONFIGS if key[:3] == ("routed", n, k)]
        if swept:
            return GEMV_CONFIGS["routed", n, k, min(swept, key=lambda p: (abs(math.log(p / max(pairs, 1))), p))]
        m = 1
    return _config("gemv", n, k, m, GEMV_DEFAULT)


def load_configs(text: str) -> None:
    """Settings written by bench/nf4_kernel.py ("gemv,N,K[,M]", "routed,N,K,PAIRS": [...]) into
    GEMV_CONFIGS."""
    import json

    for key, value in json.loads(text).items():
        path, *dims = key.split(",")
        GEMV_CONFIGS[(path, *map(int, dims))] = tuple(value)


def _gemv_split(split: int, k: int, unit: int) -> int:
    """The largest split-K up to `split` whose splits cover whole units of K (64-weight NF4
    blocks, 16-byte int8 runs)."""
    while split > 1 and k % (split * unit):
        split -= 1
    return split


@dataclass(frozen=True)
class Rotary:
    """Where the QKV product's RoPE epilogue puts its results (rope_kv's arguments)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Routed:
    """A MoE layer's routed product: W stacks the experts' matrices of `rows` rows each, and
    output row p is x's row p // per_x times expert experts[p]'s rows (per_x: the top k, for the
    product that every pair of a token reads the token's row of; 1 for one row per pair)."""

    experts: torch.Tensor  # [pairs] int32, on the device
    rows: int
    per_x: int = 1


def nf4_matmul(x: torch.Tensor, w: NF4Weights, out: torch.Tensor | None = None,
               config: tuple | None = None, act: str | None = None, rope: Rotary | None = None,
               routed: Routed | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(W [N, K])^T (+ bias) -> [M, N]. Up to 4 rows (decoding), the result
    is fp32 (the consumers are Triton kernels that read any float); more rows: x's dtype.
    Epilogues, for 1-4 rows and a setting without split-K: act "silu" or "gelu_tanh" (W is
    [gate; up]): act(gate) * up [M, N / 2] in x's dtype; rope (W is [q; k; v]): what rope_kv does with the product,
    returning rotated q [M, H, D] in the caches' dtype. `routed`: one GEMV row per (token,
    expert) pair, any number of pairs, [pairs, rows] (act: [pairs, rows / 2])."""
    m, n, k = x.shape[0], w.n, w.k
    dummy = w.absmax
    common = (w.packed, w.absmax, w.absmax2 if w.double else dummy, w.code2 if w.double else dummy,
              w.bias if w.bias is not None else dummy)
    pairs = 1
    if routed is not None:
        if w.bias is not None or rope is not None or m * routed.per_x != routed.experts.numel():
            raise ValueError("a routed product takes one row per top_k pairs, no bias, no RoPE")
    if m <= 4 or routed is not None:
        block_n, block_k, warps, split, x_vec, packed, *more = config or _gemv_config(n, k, m, routed)
        if routed is not None:
            m, n, pairs = 1, routed.rows, routed.experts.numel()
        prefetch = bool(more and more[0])
        packed = packed and x.dtype == torch.bfloat16 and x.stride(0) % 2 == 0
        whole_rows = m == 1 and routed is None or x.stride(0) % 8 == 0
        x_vec = x_vec and x.data_ptr() % 16 == 0 and whole_rows  # 16-byte loads of x
        split = _gemv_split(split, k, 64)
        block_k = _fit_block_k(block_k, k // split, 64)
        out, target = _gemv_output(x, n, split, block_n, out, act is not None, rope, dummy,
                                   rows=pairs if routed is not None else None)
        _nf4_gemv_kernel[(triton.cdiv(n, block_n), split, pairs)](
            x, *common, out, w.offset if w.double else dummy, w.tables,
            n, k, k // split, x.stride(0), out.stride(0), *target,
            routed.experts if routed is not None else dummy, M=m, DOUBLE=w.double,
            HAS_BIAS=w.bias is not None, ATOMIC=split > 1, EVEN_N=n % block_n == 0, BLOCK_N=block_n,
            GROUPS=block_k // 64, X_VEC=x_vec, PACKED=packed, PREFETCH=prefetch, SILU=act is not None,
            GELU=act == "gelu_tanh", ROPE=rope is not None,
            HEAD_D=rope.head_dim if rope else block_n, PDL=pdl_available(x.device) and GEMV_TRIGGERS_NEXT,
            ROUTED=routed is not None, PAIRS_PER_X=routed.per_x if routed is not None else 1, num_warps=warps)
        return out
    return _dequantized_matmul(x, w, out, act is not None, rope)


def _gemv_output(x: torch.Tensor, n: int, split: int, block_n: int, out: torch.Tensor | None, silu: bool,
                 rope: Rotary | None, dummy: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, tuple]:
    """A GEMV's output (fp32 [M, N], zeroed for split-K; or what its epilogue makes) and the
    RoPE arguments (dummies without it), after checking that the epilogue can run."""
    m = x.shape[0] if rows is None else rows
    if (silu or rope) and split > 1:
        raise ValueError("an epilogue in the GEMV needs a setting without split-K")
    if silu and n % 2:
        raise ValueError("the SiLU epilogue needs [gate; up] rows")
    if rope and (rope.head_dim % block_n or n != (rope.heads + 2 * rope.kv_heads) * rope.head_dim):
        raise ValueError("the RoPE epilogue needs [q; k; v] rows and programs within one head")
    if out is None:
        if rope:
            shape, dtype = (m, rope.heads, rope.head_dim), rope.k_cache.dtype
        else:
            shape, dtype = ((m, n // 2), x.dtype) if silu else ((m, n), torch.float32)
        out = (torch.zeros if split > 1 else torch.empty)(shape, dtype=dtype, device=x.device)
    target = (rope.cos, rope.sin, rope.positions, rope.slots, rope.k_cache, rope.v_cache, rope.heads,
              rope.kv_heads, rope.k_cache.shape[2]) if rope else (dummy,) * 6 + (0, 0, 0)
    return out, target


def _dequantized_matmul(x: torch.Tensor, w, out: torch.Tensor | None, silu: bool, rope: Rotary | None):
    """More rows (batches, prefill): the matrix dequantized, then one GEMM on the tensor cores."""
    if silu or rope:
        raise ValueError("the GEMV's epilogues are for 1-4 rows")
    full = w.dequantize(torch.empty(w.n * w.k, dtype=x.dtype, device=x.device))
    result = torch.nn.functional.linear(x, full, None if w.bias is None else w.bias.to(x.dtype))
    return result if out is None else out.copy_(result)


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


# ---- int8 ------------------------------------------------------------------------------------
# bitsandbytes' LLM.int8() weights: int8 rows (CB) and an absmax per row (SCB), a weight being
# CB * SCB / 127. The GEMV multiplies the activations by exactly that, in fp32: bitsandbytes'
# dequantize-then-matmul, without LLM.int8()'s int8 activations and fp16 outlier columns (which
# make its own product slow at one row: 7 tokens/s for an 8B model on an H100).
# Four int8 weights (one word) to fp32 without the conversion unit (a quarter of the FMA
# pipe's rate, which would bound the GEMV near the memory's): q + 128 as the low byte of the
# mantissa of 2^23, then 2^23 + 128 subtracted, exactly.
_INT8_ASM = tl.constexpr("""{
.reg .b32 u, m;
xor.b32 u, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, u, m, 0x7540;
prmt.b32 $1, u, m, 0x7541;
prmt.b32 $2, u, m, 0x7542;
prmt.b32 $3, u, m, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")


@triton.jit
def _int8_decode4(words):
    """int32 words -> their 4 int8 weights as fp32, byte i (little-endian) as v_i."""
    v0, v1, v2, v3 = tl.inline_asm_elementwise(_INT8_ASM, "=r,=r,=r,=r,r", [words],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return (v0.to(tl.float32, bitcast=True), v1.to(tl.float32, bitcast=True), v2.to(tl.float32, bitcast=True),
            v3.to(tl.float32, bitcast=True))


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, K_SPLIT, stride_xm, stride_om,
                      cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX,
                      M: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_N: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, GELU: tl.constexpr,
                      ROPE: tl.constexpr, HEAD_D: tl.constexpr, PDL: tl.constexpr):
    """The int8 counterpart of _nf4_gemv_kernel (its rows, split-K and epilogues): rows of
    BLOCK_K int8 weights read as words, summed against x in fp32, scaled by SCB / 127 per row."""
    if PDL:  # the next kernel may launch (it waits for this one's results)
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, row_ok, head, first = _gemv_rows(pid_n, N, BLOCK_N, SILU, ROPE, HEAD_D)
    WORDS: tl.constexpr = BLOCK_K // 4
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    kw = K >> 2
    acc0 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    k_begin = pid_k * K_SPLIT
    for k0 in tl.range(k_begin, k_begin + K_SPLIT, BLOCK_K):
        at = rows[:, None] * kw + ((k0 >> 2) + tl.arange(0, WORDS))[None, :]
        if EVEN_N:
            words = tl.load(w32 + at)
        else:
            words = tl.load(w32 + at, mask=row_ok[:, None], other=0)
        v0, v1, v2, v3 = _int8_decode4(words)
        for r in tl.static_range(M):
            x = tl.load(x_ptr + r * stride_xm + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (WORDS, 2, 2)))  # x[4j + 2a], x[4j + 2a + 1]
            x0, x2 = tl.split(x_even)
            x1, x3 = tl.split(x_odd)
            part = v0 * x0[None, :] + v1 * x1[None, :] + v2 * x2[None, :] + v3 * x3[None, :]
            if r == 0:
                acc0 += part
            elif r == 1:
                acc1 += part
            elif r == 2:
                acc2 += part
            else:
                acc3 += part
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    for r in tl.static_range(M):
        if r == 0:
            y = tl.sum(acc0, axis=1) * scale
        elif r == 1:
            y = tl.sum(acc1, axis=1) * scale
        elif r == 2:
            y = tl.sum(acc2, axis=1) * scale
        else:
            y = tl.sum(acc3, axis=1) * scale
        _gemv_epilogue(y, r, rows, row_ok, pid_n, pid_k, head, first, out_ptr, stride_om, bias_ptr, N, cos_ptr,
                       sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, H, KV, CTX, HAS_BIAS, ATOMIC, SILU, GELU,
                       ROPE, BLOCK_N, HEAD_D)


@triton.jit
def _int8_dequant_kernel(w_ptr, scale_ptr, out_ptr, TOTAL, K, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < TOTAL
    w = tl.load(w_ptr + i, mask=ok, other=0).to(tl.float32)
    tl.store(out_ptr + i, (w * tl.load(scale_ptr + i // K, mask=ok, other=0.0)).to(out_ptr.dtype.element_ty), mask=ok)


class Int8Weights:
    """One or more bitsandbytes Linear8bitLt layers (int8 inference weights) fused along the
    output dimension: their int8 rows as they are, and SCB / 127 per row."""

    @staticmethod
    def _statistics(module) -> torch.Tensor | None:
        scb = getattr(module.weight, "SCB", None)
        if scb is None:  # after bitsandbytes' first forward, the statistics live in its state
            scb = getattr(getattr(module, "state", None), "SCB", None)
        return scb

    @classmethod
    def unsupported(cls, modules: list) -> str | None:
        """Why these layers cannot be fused and read by the kernel (None: they can)."""
        for m in modules:
            if m.weight.dtype != torch.int8 or cls._statistics(m) is None or m.weight.dim() != 2:
                return "not an int8 inference layer (int8 rows and their SCB)"
        k = int(modules[0].weight.shape[1])
        if any(int(m.weight.shape[1]) != k for m in modules) or k % 16:
            return "the int8 GEMV reads rows of whole 16-byte runs"
        return None

    def __init__(self, modules: list) -> None:
        reason = self.unsupported(modules)
        if reason:
            raise ValueError(reason)
        rows = [m.weight.data for m in modules]
        scales = [self._statistics(m).float().reshape(-1) * (1.0 / 127) for m in modules]
        self.n = sum(int(r.shape[0]) for r in rows)
        self.k = int(rows[0].shape[1])
        self.packed = torch.cat([r.reshape(-1) for r in rows]).contiguous()
        self.scale = torch.cat(scales).contiguous()
        self.bias = _fused_bias(modules)

    @property
    def nbytes(self) -> int:
        parts = [self.packed, self.scale, self.bias]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def matmul(self, x: torch.Tensor, **kw) -> torch.Tensor:
        return int8_matmul(x, self, **kw)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """The full matrix [N, K] in out's dtype."""
        total = self.packed.numel()
        _int8_dequant_kernel[(triton.cdiv(total, 1024),)](self.packed, self.scale, out, total, self.k, BLOCK=1024,
                                                          num_warps=4)
        return out.view(self.n, self.k)

    def gemv_setting(self, rows: int) -> tuple[int, int]:
        """(BLOCK_N, split-K), as NF4Weights.gemv_setting."""
        config = _config("int8", self.n, self.k, rows, INT8_DEFAULT)
        return config[0], _gemv_split(config[3], self.k, 16)


# BLOCK_N, BLOCK_K (weights per row and step), warps, split-K, for shapes GEMV_CONFIGS lacks: on
# the H200, the best or within 8% of it on Llama-3-8B's qkv, o and gate_up at 1 and 2 rows
# (down, with K = 14336, prefers split-K)
INT8_DEFAULT = (16, 1024, 4, 1)


def int8_matmul(x: torch.Tensor, w: Int8Weights, out: torch.Tensor | None = None, config: tuple | None = None,
                act: str | None = None, rope: Rotary | None = None) -> torch.Tensor:
    """nf4_matmul's contract for int8 weights."""
    m, n, k = x.shape[0], w.n, w.k
    if m > 4:
        return _dequantized_matmul(x, w, out, act is not None, rope)
    block_n, block_k, warps, split = config or _config("int8", n, k, m, INT8_DEFAULT)
    split = _gemv_split(split, k, 16)
    block_k = _fit_block_k(block_k, k // split, 16)
    out, target = _gemv_output(x, n, split, block_n, out, act is not None, rope, w.scale)
    _int8_gemv_kernel[(triton.cdiv(n, block_n), split)](
        x, w.packed, w.scale, w.bias if w.bias is not None else w.scale, out, n, k, k // split, x.stride(0),
        out.stride(0), *target, M=m, HAS_BIAS=w.bias is not None, ATOMIC=split > 1, EVEN_N=n % block_n == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, SILU=act is not None, GELU=act == "gelu_tanh", ROPE=rope is not None, HEAD_D=rope.head_dim if rope else block_n,
        PDL=pdl_available(x.device) and GEMV_TRIGGERS_NEXT, num_warps=warps)
    return out
