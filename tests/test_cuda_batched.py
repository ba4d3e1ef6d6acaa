"""The batched quantized products (batched.py) against bitsandbytes' dequantize-then-matmul on
Llama-3-8B's matrices at 2-64 rows: NF4 and FP4 with and without double quant, int8, the
settings the sweep chooses among (GPU only; CI runs them in the interpreter:
test_batched_interpreted)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

B = pytest.importorskip("daemon.engine.cuda.batched") if torch.cuda.is_available() else None
G = pytest.importorskip("daemon.engine.cuda.gemv") if torch.cuda.is_available() else None
BF = pytest.importorskip("bitsandbytes.functional") if torch.cuda.is_available() else None

# Llama-3-8B's fused products: [q; k; v], o, [gate; up], down
LLAMA = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "o": [(4096, 4096)],
         "gate_up": [(14336, 4096), (14336, 4096)], "down": [(4096, 14336)]}


class _Param:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _Module:
    def __init__(self, n, k, double, quant_type="nf4", bias=False):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        q, st = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        self.weight = _Param(q, st)
        self.bias = torch.randn(n, dtype=torch.bfloat16, device="cuda") if bias else None
        self.ref = BF.dequantize_4bit(q, st)


class _Int8Module:
    def __init__(self, n, k):
        w = torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
        cb, scb, _ = BF.int8_vectorwise_quant(w)
        self.weight = torch.nn.Parameter(cb, requires_grad=False)
        self.weight.SCB = scb
        self.bias = None
        self.ref = BF.int8_vectorwise_dequant(cb, scb)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def nf4_products():
    cache = {}

    def get(name, double, quant_type):
        key = (name, double, quant_type)
        if key not in cache:
            cache.clear()  # one product's copies at a time
            mods = [_Module(n, k, double, quant_type) for n, k in LLAMA[name]]
            cache[key] = mods, G.NF4Weights(mods)
        return cache[key]

    return get


@pytest.mark.parametrize("double, quant_type", [(True, "nf4"), (False, "nf4"), (True, "fp4"), (False, "fp4")])
@pytest.mark.parametrize("name", list(LLAMA))
@pytest.mark.parametrize("rows", [2, 5, 8, 16, 31, 32, 64])
def test_nf4_batched_product_matches_bitsandbytes(nf4_products, name, double, quant_type, rows):
    mods, w = nf4_products(name, double, quant_type)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    ref = x @ torch.cat([m.ref for m in mods]).T  # bitsandbytes' dequantize, then matmul
    out = B.matmul(x, w)
    assert out.shape == (rows, w.n) and not torch.isnan(out).any() and rel(out, ref) < 1e-2


# (BLOCK_N, BLOCK_K, warps, split-K, stages): the sweep's corners
SETTINGS = [(32, 128, 4, 1, 1), (64, 256, 4, 2, 3), (128, 256, 8, 4, 2), (64, 512, 4, 1, 2), (16, 64, 4, 8, 1)]


@pytest.mark.parametrize("config", SETTINGS)
@pytest.mark.parametrize("rows", [8, 48])
def test_every_swept_setting_matches(config, rows):
    mods = [_Module(1024, 4096, True, bias=True), _Module(512, 4096, True, bias=True)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    ref = x @ torch.cat([m.ref for m in mods]).T + torch.cat([m.bias for m in mods])
    assert rel(B.matmul(x, w, config=config), ref) < 1e-2


@pytest.mark.parametrize("name", list(LLAMA))
@pytest.mark.parametrize("rows", [2, 8, 32, 64])
def test_int8_batched_product_matches_the_dequantized_product(name, rows):
    mods = [_Int8Module(n, k) for n, k in LLAMA[name]]
    w = G.Int8Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ torch.cat([m.ref for m in mods]).float().T
    assert rel(B.matmul(x, w), ref) < 1e-2


def test_graph_capture_replays_the_product():
    mods = [_Module(4096, 4096, True)]
    w = G.NF4Weights(mods)
    x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros(16, 4096, device="cuda")
    B.matmul(x, w, out=out.zero_())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        B.matmul(x, w, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel(out, x @ mods[0].ref.T) < 1e-2


@pytest.mark.parametrize("tokens,per_x", [(40, 8), (300, 8), (300, 1)])
def test_grouped_experts_on_qwen3_moe_shapes(tokens, per_x):
    """The long passes' grouped product on Qwen3-30B-A3B's experts (128 of [gate; up] 1536 x
    2048, 8 a token, quantized as moe.py does: each its own bitsandbytes weight, double quant),
    at each tile height, against the pairs' products on bitsandbytes' dequantized experts."""
    from daemon.engine.cuda.moe import _quantized

    torch.manual_seed(tokens)
    count, n, k, top_k = 128, 1536, 2048, 8
    stack = torch.randn(count, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    w = _quantized(stack, "nf4", True)
    dense = w.dequantize(torch.empty(w.n * w.k, dtype=torch.bfloat16, device="cuda")).view(count, n, k)
    chosen = torch.stack([torch.randperm(count, device="cuda")[:top_k] for _ in range(tokens)]).flatten().int()
    x = torch.randn(tokens * top_k // per_x, k, dtype=torch.bfloat16, device="cuda")
    got = B.grouped_matmul(x, w, B.GroupedLayout.of(chosen, count), n, per_x=per_x)
    rows = torch.arange(chosen.numel(), device="cuda") // per_x
    want = torch.bmm(x[rows].float()[:, None], dense[chosen.long()].float().transpose(1, 2))[:, 0]
    assert rel(got, want) < 1e-2
