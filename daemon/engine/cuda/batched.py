"""Batched quantized products (decode batches, prompt passes up to MAX_ROWS) straight from
bitsandbytes' packed weights, on the tensor cores, without a bf16 copy of the matrix.

A program takes BLOCK_N weight rows over K_SPLIT inputs and a tile of x's rows (up to 64, padded
to BLOCK_M >= 16, the smallest `tl.dot`): up to 64 rows the weights are read once per step
whatever the row count, as the GEMV reads them for one row; more rows take more tiles, whose
programs on the same weights run side by side (the second read meets L2). NF4 / FP4 words are decoded in registers by the
GEMV's byte permutes (nf4_decode) into bf16 pairs, scaled by their block's absmax in bf16x2,
and multiplied as the A operand of W x^T (the rows of x are the dot's narrow N side: the
"swap AB" of Marlin and of vLLM's small-batch kernels), so that tensor cores see [BLOCK_N, K] x
[K, BLOCK_M] tiles. int8 rows convert to bf16 exactly (|q| <= 127) and take SCB / 127 per output
row after the dot. Split programs add fp32 sums atomically into a zeroed output; the result is
fp32 [M, N], as the GEMV's.

The weight is rounded once more than bitsandbytes' dequantize-then-matmul (bf16 code times
bf16 absmax, rounded to bf16; bitsandbytes rounds the fp32 product once): within bf16's
tolerance of it, as the GEMV is (tests/test_cuda_gemv, tests/test_gemv_interpreted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from daemon.engine.cuda import gemv as G

# The most rows of x one program multiplies (BLOCK_M); more take several tiles, side by side.
TILE_ROWS = 64
# Rows up to which the forward pass takes this product; more (long prompt passes) dequantize
# the matrix into a scratch buffer for one cuBLAS GEMM (bench/batched_kernel.py times both).
MAX_ROWS = 64
# (BLOCK_N, BLOCK_K, warps, split-K, stages) for shapes the sweep has not set
# (gemv.GEMV_CONFIGS "mm" / "mm8" keys, by BLOCK_M)
NF4_DEFAULT = (64, 256, 4, 2, 3)
INT8_DEFAULT = (64, 128, 4, 2, 3)

# bf16 pairs times a bf16 pair: a weight's code times its block's absmax, both halves at once
_SCALE_ASM = tl.constexpr("""{
.reg .b32 z;
mov.b32 z, 0;
fma.rn.bf16x2 $0, $1, $2, z;
}""")


@triton.jit
def _scaled(pairs, scale):
    return tl.inline_asm_elementwise(_SCALE_ASM, "=r,r,r", [pairs, scale], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _bf16_pair(value):
    """fp32 [..] -> the value rounded to bf16, in both halves of an int32."""
    bits = value.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _as_bf16(p0, p1, p2, p3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 4 bf16 pairs [BLOCK_N, G, 8] of each word (weights 2i, 2i + 1 of the word in p_i)
    as the weights [BLOCK_N, BLOCK_K] in memory order."""
    words = tl.join(tl.join(p0, p2), tl.join(p1, p3))  # [.., 8, 2, 2]: [j, i] = p_(2i + j)
    halves = tl.join(words.to(tl.int16), (words >> 16).to(tl.int16))  # low half first
    return tl.reshape(halves, (BLOCK_N, BLOCK_K)).to(tl.bfloat16, bitcast=True)


@triton.jit
def _x_tile(x_ptr, x_rows, m_ok, stride_xm, k0, BLOCK_K: tl.constexpr):
    at = x_ptr + x_rows[:, None] * stride_xm + k0 + tl.arange(0, BLOCK_K)[None, :]
    return tl.load(at, mask=m_ok[:, None], other=0.0).to(tl.bfloat16)


@triton.jit
def _tile_rows(m0, M, sorted_ptr, tile_expert_ptr, N, GROUPED: tl.constexpr, PER_X: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """(x's rows, which are real, the output's rows, the weight's first row) of this program's
    tile: rows m0.. of x and out; GROUPED (a MoE layer's experts, moe.py): the tile's slots of
    the pairs sorted by expert (M: the pair count, padding slots), x's row pair // PER_X, the
    output's row the pair, the rows of the tile's expert (-1: a tile past the last, no work)."""
    m = m0 + tl.arange(0, BLOCK_M)
    if GROUPED:
        pairs = tl.load(sorted_ptr + m)
        expert = tl.load(tile_expert_ptr + m0 // BLOCK_M)
        return pairs // PER_X, (pairs < M) & (expert >= 0), pairs, expert * N
    return m, m < M, m, 0


@triton.jit
def _store_rows(acc, rows, row_ok, pid_k, out_rows, m_ok, out_ptr, bias_ptr, stride_om, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] = (W x^T) of this program's rows -> out's rows (+ bias once)."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    at = out_ptr + out_rows[None, :] * stride_om + rows[:, None]
    ok = row_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(at, acc, mask=ok, sem="relaxed")
    else:
        tl.store(at, acc, mask=ok)


@triton.jit
def _nf4_mm_kernel(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, bias_ptr, out_ptr, offset_ptr, tables_ptr,
                   M, N, K, K_SPLIT, stride_xm, stride_om, sorted_ptr, tile_expert_ptr, DOUBLE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, STAGES: tl.constexpr, GROUPED: tl.constexpr = False,
                   PER_X: tl.constexpr = 1):
    # programs over the tiles of x's rows come first, side by side: a weight block's second read
    # (more than BLOCK_M rows) hits L2
    m0 = tl.program_id(0) * BLOCK_M
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    x_rows, m_ok, out_rows, first_row = _tile_rows(m0, M, sorted_ptr, tile_expert_ptr, N, GROUPED, PER_X, BLOCK_M)
    if first_row < 0:  # a grouped tile past the last expert's
        return
    # the byte tables per lane, as the GEMV reads them (see gemv._nf4_gemv_kernel)
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
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    BLOCK_K: tl.constexpr = GROUPS * 64
    k_begin = pid_k * K_SPLIT
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_begin, k_begin + K_SPLIT, BLOCK_K, num_stages=STAGES):
        words, raw, scale, shift = G._load_block(w_ptr, absmax_ptr, absmax2_ptr, offset_ptr, first_row + rows, row_ok,
                                                 K, k0, DOUBLE, EVEN_N, GROUPS)
        am = _bf16_pair(G._block_absmax(code2_ptr, raw, scale, shift, DOUBLE))
        p0, p1, p2, p3 = G._nf4_pairs(words, t0, t1, t2, t3, t4, t5, t6, t7)
        am = am + tl.zeros(p0.shape, tl.int32)
        w = _as_bf16(_scaled(p0, am), _scaled(p1, am), _scaled(p2, am), _scaled(p3, am), BLOCK_N, BLOCK_K)
        acc = tl.dot(w, tl.trans(_x_tile(x_ptr, x_rows, m_ok, stride_xm, k0, BLOCK_K)), acc)
    _store_rows(acc, rows, row_ok, pid_k, out_rows, m_ok, out_ptr, bias_ptr, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_om,
                    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    # programs over the tiles of x's rows come first, side by side: a weight block's second read
    # (more than BLOCK_M rows) hits L2
    m0 = tl.program_id(0) * BLOCK_M
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k_begin = pid_k * K_SPLIT
    m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(k_begin, k_begin + K_SPLIT, BLOCK_K, num_stages=STAGES):
        at = w_ptr + rows[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :]
        if EVEN_N:
            q = tl.load(at)
        else:
            q = tl.load(at, mask=row_ok[:, None], other=0)
        acc = tl.dot(q.to(tl.bfloat16), tl.trans(_x_tile(x_ptr, m, m < M, stride_xm, k0, BLOCK_K)), acc)
    acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    _store_rows(acc, rows, row_ok, pid_k, m, m < M, out_ptr, bias_ptr, stride_om, HAS_BIAS, ATOMIC)


def block_m(rows: int) -> int:
    """The tile's row count for this many rows of x (the settings' key)."""
    return min(TILE_ROWS, max(16, triton.next_power_of_2(rows)))


def setting(w: "G.NF4Weights | G.Int8Weights", rows: int) -> tuple:
    """(BLOCK_N, BLOCK_K, warps, split-K, stages) for this many rows of x, split-K fitted to K."""
    nf4 = isinstance(w, G.NF4Weights)
    block_n, block_k, warps, split, stages = G._config("mm" if nf4 else "mm8", w.n, w.k, block_m(rows),
                                                       NF4_DEFAULT if nf4 else INT8_DEFAULT)
    split = G._gemv_split(split, w.k, 64 if nf4 else 16)
    return block_n, G._fit_block_k(block_k, w.k // split, 64 if nf4 else 16), warps, split, stages


def matmul(x: torch.Tensor, w: "G.NF4Weights | G.Int8Weights", out: torch.Tensor | None = None,
           config: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> fp32 [M, N], in tiles of up to TILE_ROWS rows. `out`: a zeroed
    fp32 buffer for a split-K setting (else one is made)."""
    m, n, k = x.shape[0], w.n, w.k
    nf4 = isinstance(w, G.NF4Weights)
    if x.stride(1) != 1:  # the tiles read K contiguously
        x = x.contiguous()
    if config is None:
        block_n, block_k, warps, split, stages = setting(w, m)
    else:
        block_n, block_k, warps, split, stages = config
        split = G._gemv_split(split, k, 64 if nf4 else 16)
        block_k = G._fit_block_k(block_k, k // split, 64 if nf4 else 16)
    if out is None:
        out = (torch.zeros if split > 1 else torch.empty)((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, TILE_ROWS), triton.cdiv(n, block_n), split)
    shape = dict(ATOMIC=split > 1, EVEN_N=n % block_n == 0, BLOCK_M=block_m(m), BLOCK_N=block_n, STAGES=stages,
                 num_warps=warps)
    if nf4:
        dummy = w.absmax
        _nf4_mm_kernel[grid](x, w.packed, w.absmax, w.absmax2 if w.double else dummy,
                             w.code2 if w.double else dummy, w.bias if w.bias is not None else dummy, out,
                             w.offset if w.double else dummy, w.tables, m, n, k, k // split, x.stride(0),
                             out.stride(0), dummy, dummy, DOUBLE=w.double, HAS_BIAS=w.bias is not None,
                             GROUPS=block_k // 64, **shape)
    else:
        _int8_mm_kernel[grid](x, w.packed, w.scale, w.bias if w.bias is not None else w.scale, out, m, n, k,
                              k // split, x.stride(0), out.stride(0), HAS_BIAS=w.bias is not None, BLOCK_K=block_k,
                              **shape)
    return out


@triton.jit(do_not_specialize=["PAIRS", "TILES"])
def _grouped_layout_kernel(experts_ptr, sorted_ptr, tile_expert_ptr, PAIRS, TILES, BM: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program e: expert e's run of the layout. Every program counts all the pairs' experts (a
    histogram, from L2 after the first), so each knows where its run starts without a second
    launch; then it writes its pairs in order (stable), its run's padding and its tiles' expert,
    and program 0 marks the tiles past the last run."""
    e = tl.program_id(0)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for p0 in range(0, PAIRS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = p < PAIRS
        counts += tl.histogram(tl.load(experts_ptr + p, mask=ok, other=0).to(tl.int32), BLOCK_E, mask=ok)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    this = tl.arange(0, BLOCK_E) == e
    end = tl.sum(tl.where(this, ends, 0), 0)
    size = tl.sum(tl.where(this, padded, 0), 0)
    start = end - size
    slot = start
    for p0 in range(0, PAIRS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mine = tl.load(experts_ptr + p, mask=p < PAIRS, other=-1).to(tl.int32) == e
        tl.store(sorted_ptr + slot + tl.cumsum(mine.to(tl.int32), 0) - 1, p, mask=mine)
        slot += tl.sum(mine.to(tl.int32), 0)
    pad = slot + tl.arange(0, BM)
    tl.store(sorted_ptr + pad, PAIRS, mask=pad < end)
    for t0 in range(start // BM, end // BM, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tl.store(tile_expert_ptr + t, e, mask=t < end // BM)
    if e == 0:
        for t0 in range(tl.sum(padded, 0) // BM, TILES, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tl.store(tile_expert_ptr + t, -1, mask=t < TILES)


@dataclass(frozen=True)
class GroupedLayout:
    """A MoE layer's pairs sorted into per-expert tiles (vLLM's fused_moe layout: each expert's
    run padded to whole tiles of `block_m`), worked out once a layer for both its products, on the
    GPU in one launch without a host sync (_grouped_layout_kernel), so decode steps capture it."""

    pairs: int
    block_m: int
    sorted_ids: torch.Tensor  # [tiles * block_m] int32: the pair in each slot, `pairs` for padding
    tile_expert: torch.Tensor  # [tiles] int32: each tile's expert, -1 past the last run

    @staticmethod
    def of(experts: torch.Tensor, count: int) -> "GroupedLayout":
        """The layout of the pairs' experts [pairs] among `count`, in one launch."""
        pairs = experts.numel()
        bm = block_m(-(-pairs // count))
        tiles = -(-(pairs + min(count, pairs) * (bm - 1)) // bm)  # the most the padded runs can take
        # slots past the last run are never read: their tiles are marked -1
        sorted_ids = torch.empty(tiles * bm, dtype=torch.int32, device=experts.device)
        tile_expert = torch.empty(tiles, dtype=torch.int32, device=experts.device)
        if pairs:
            _grouped_layout_kernel[(count,)](experts, sorted_ids, tile_expert, pairs, tiles, BM=bm,
                                             BLOCK_E=triton.next_power_of_2(count), BLOCK_P=512, BLOCK_T=64)
        return GroupedLayout(pairs, bm, sorted_ids, tile_expert)


def grouped_matmul(x: torch.Tensor, w: "G.NF4Weights", layout: GroupedLayout, n: int,
                   per_x: int = 1) -> torch.Tensor:
    """A MoE layer's pairs through their experts' 4-bit matrices (w stacks the experts of `n`
    rows each): out [pairs, n] fp32, out[p] = x[p // per_x] @ W_{expert of p}^T, each expert's
    matrix read once per tile of its pairs, so a pass of any length is one launch a product, not
    one GEMM per expert."""
    k = w.k
    out = torch.empty((layout.pairs, n), dtype=torch.float32, device=x.device)
    if layout.pairs == 0:
        return out
    bm = layout.block_m
    block_n, block_k, warps, _, stages = G._config("mm", n, k, bm, NF4_DEFAULT)
    block_k = G._fit_block_k(block_k, k, 64)
    dummy = w.absmax
    grid = (layout.tile_expert.numel(), triton.cdiv(n, block_n), 1)
    _nf4_mm_kernel[grid](x, w.packed, w.absmax, w.absmax2 if w.double else dummy, w.code2 if w.double else dummy,
                         dummy, out, w.offset if w.double else dummy, w.tables, layout.pairs, n, k, k, x.stride(0),
                         out.stride(0), layout.sorted_ids, layout.tile_expert, DOUBLE=w.double, HAS_BIAS=False,
                         ATOMIC=False, EVEN_N=n % block_n == 0, BLOCK_M=bm, BLOCK_N=block_n, GROUPS=block_k // 64,
                         STAGES=stages, GROUPED=True, PER_X=per_x, num_warps=warps)
    return out
