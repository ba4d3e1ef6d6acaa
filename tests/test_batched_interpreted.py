"""The batched quantized products (batched.py) on the CPU, in Triton's interpreter (inline PTX
emulated, tests/triton_cpu.py), against bitsandbytes' dequantize-then-matmul: NF4 and FP4 with
and without double quant, int8, at the row counts the tiles pad (5 to 64) and past one tile, split-K,
biases and ragged N. A GPU runs the real thing: test_cuda_batched."""

import pytest
import torch
from triton_cpu import interpreted  # skips this module where the interpreter cannot run the kernels

from daemon.engine.cuda import batched as B
from daemon.engine.cuda import gemv as G

functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def emulated_ptx(monkeypatch):
    interpreted(monkeypatch, G)


class _Param:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _Module:
    def __init__(self, n, k, double, gen, quant_type="nf4", bias=False):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        q, st = functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        self.weight = _Param(q, st)
        self.bias = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
        self.ref = functional.dequantize_4bit(q, st)


class _Int8Module:
    def __init__(self, n, k, gen, bias=False):
        w = torch.randn(n, k, generator=gen) * 0.02
        scb = w.abs().amax(dim=1)
        self.weight = torch.nn.Parameter(torch.round(w * 127 / scb[:, None]).to(torch.int8), requires_grad=False)
        self.weight.SCB = scb
        self.bias = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
        self.ref = self.weight.float() * (scb[:, None] * (1.0 / 127))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(x, mods):
    out = x.float() @ torch.cat([m.ref.float() for m in mods]).T
    if all(m.bias is not None for m in mods):
        out += torch.cat([m.bias for m in mods]).float()
    return out


# (BLOCK_N, BLOCK_K, warps, split-K, stages)
NF4_CASES = [(5, True, "nf4", (32, 128, 4, 1, 1)), (16, False, "nf4", (16, 64, 4, 2, 1)),
             (33, True, "fp4", (32, 128, 4, 2, 2)), (64, False, "fp4", (16, 256, 4, 1, 1))]


@pytest.mark.parametrize("rows, double, quant_type, config", NF4_CASES,
                         ids=["5 rows nf4+dq", "16 rows nf4 split-K", "33 rows fp4+dq split-K", "64 rows fp4"])
def test_nf4_batched_product_matches_bitsandbytes(rows, double, quant_type, config):
    gen = torch.Generator().manual_seed(rows)
    mods = [_Module(48, 256, double, gen, quant_type, bias=True), _Module(32, 256, double, gen, quant_type, bias=True)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    got = B.matmul(x, w, config=config)
    assert got.shape == (rows, w.n) and got.dtype == torch.float32
    assert rel(got, reference(x, mods)) < 1e-2


@pytest.mark.parametrize("rows, config", [(7, (32, 64, 4, 1, 1)), (40, (16, 128, 4, 2, 2))],
                         ids=["7 rows", "40 rows split-K"])
def test_int8_batched_product_matches_the_dequantized_product(rows, config):
    gen = torch.Generator().manual_seed(rows)
    mods = [_Int8Module(40, 256, gen, bias=True), _Int8Module(24, 256, gen, bias=True)]
    w = G.Int8Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    assert rel(B.matmul(x, w, config=config), reference(x, mods)) < 1e-3  # the weights exact in bf16


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_more_rows_than_a_tile_run_tiles_side_by_side(kind):
    """130 rows: two whole tiles of 64 and a ragged one, split-K, x a strided view (a column
    slice of a wider tensor) as a caller may pass it."""
    gen = torch.Generator().manual_seed(130)
    mods = ([_Module(32, 128, True, gen, bias=True)] if kind == "nf4" else [_Int8Module(32, 128, gen, bias=True)])
    w = (G.NF4Weights if kind == "nf4" else G.Int8Weights)(mods)
    wide = torch.randn(130, 2 * w.k, generator=gen).to(torch.bfloat16)
    x = wide[:, w.k:]
    assert B.block_m(130) == B.TILE_ROWS
    got = B.matmul(x, w, config=(16, 64, 4, 2, 1))
    assert got.shape == (130, w.n) and rel(got, reference(x, mods)) < 1e-2


@pytest.mark.parametrize("pairs,count", [(1, 4), (8, 128), (256, 128), (300, 5), (1200, 3), (0, 8)])
def test_the_grouped_layout_is_a_stable_sort_into_padded_runs(pairs, count):
    """GroupedLayout.of in its one launch: each expert's pairs in their order, its run padded
    to whole tiles (padding slots hold `pairs`), each tile its run's expert, the tiles past the
    last run -1; more pairs than one program's block (1,200) and experts no pair picked."""
    gen = torch.Generator().manual_seed(pairs + count)
    experts = torch.randint(0, count, (pairs,), generator=gen, dtype=torch.int32)
    if pairs > 1:
        experts[experts == count - 1] = 0  # the last expert never picked
    layout = B.GroupedLayout.of(experts, count)
    bm = layout.block_m
    want_ids: list[int] = []
    want_tiles: list[int] = []
    for e in range(count):
        run = [p for p, x in enumerate(experts.tolist()) if x == e]
        padded = -(-len(run) // bm) * bm
        want_ids += run + [pairs] * (padded - len(run))
        want_tiles += [e] * (padded // bm)
    tiles = layout.tile_expert.tolist()
    assert tiles == want_tiles + [-1] * (len(tiles) - len(want_tiles))
    assert layout.sorted_ids[:len(want_ids)].tolist() == want_ids


@pytest.mark.parametrize("tokens,top_k,double,per_x", [(70, 2, True, 2), (9, 2, False, 1), (40, 4, True, 1)])
def test_the_grouped_product_multiplies_each_pair_by_its_expert(tokens, top_k, double, per_x):
    """A MoE layer's long pass (moe._grouped): the pairs sorted into per-expert tiles, each
    output row its pair's token (per_x: every pair of a token reads its row) times its expert's
    matrix, whatever the order the pairs come in, an expert no pair picked, runs past one tile."""
    gen = torch.Generator().manual_seed(tokens)
    experts, n, k = 5, 64, 256
    stacked = _Module(experts * n, k, double, gen)
    w = G.NF4Weights([stacked])
    chosen = torch.stack([torch.randperm(experts - 1, generator=gen)[:top_k] for _ in range(tokens)])
    chosen = chosen.flatten().to(torch.int32)  # expert 4 never picked
    rows = tokens * top_k // per_x
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    got = B.grouped_matmul(x, w, B.GroupedLayout.of(chosen, experts), n, per_x=per_x)
    ref = stacked.ref.float().view(experts, n, k)
    want = torch.stack([x[p // per_x].float() @ ref[e].T for p, e in enumerate(chosen.tolist())])
    assert got.shape == (tokens * top_k, n) and rel(got, want) < 1e-2
