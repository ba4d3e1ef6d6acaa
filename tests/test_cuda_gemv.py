"""The quantized GEMVs (gemv.py) against bitsandbytes' dequantize-then-matmul and against the
separate kernels their epilogues replace (GPU only; CI runs them in the interpreter:
test_gemv_interpreted). Fresh random inputs per case, relative error norms."""

import pytest
import torch

pytestmark = pytest.mark.gpu

K = pytest.importorskip("daemon.engine.cuda.kernels") if torch.cuda.is_available() else None
G = pytest.importorskip("daemon.engine.cuda.gemv") if torch.cuda.is_available() else None
BF = pytest.importorskip("bitsandbytes.functional") if torch.cuda.is_available() else None


class _Param:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _Module:
    def __init__(self, n, k, double, bias=False, quant_type="nf4"):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        q, st = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        self.weight = _Param(q, st)
        self.bias = torch.randn(n, dtype=torch.bfloat16, device="cuda") if bias else None
        self.ref = BF.dequantize_4bit(q, st)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("double, quant_type", [(True, "nf4"), (False, "nf4"), (True, "fp4")])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("shapes", [[(512, 256)], [(4096, 4096)], [(6144 // 3, 4096)] * 3, [(4096, 14336)],
                                    [(64, 64), (32, 64), (32, 64)], [(192, 576)]])
def test_nf4_matmul_matches_bitsandbytes(double, quant_type, rows, shapes):
    mods = [_Module(n, k, double, quant_type=quant_type) for n, k in shapes]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    ref = x @ torch.cat([m.ref for m in mods]).T  # bitsandbytes' dequantize, then matmul
    out = G.nf4_matmul(x, w)
    assert not torch.isnan(out).any() and rel(out, ref) < 1e-2


@pytest.mark.parametrize("config", [
    (16, 512, 8, 1, False, True, True), (32, 256, 4, 4, False, True, False), (16, 256, 2, 8, False, True, True),
    (32, 256, 4, 4, True, False, True), (64, 128, 2, 2, False, False, False),  # the fp32 path (fp16 activations)
])
@pytest.mark.parametrize("rows", [1, 3])
def test_nf4_gemv_settings_all_match(config, rows):
    mods = [_Module(6144, 4096, True)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros((rows, w.n), device="cuda")  # split-K programs add into it
    assert rel(G.nf4_matmul(x, w, out=out, config=config), x @ mods[0].ref.T) < 1e-2


@pytest.mark.parametrize("config", [(16, 1024, 4, 1, True, True, True), (32, 512, 4, 1, True, True, True),
                                    (64, 128, 2, 1, False, False, False)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_nf4_gemv_silu_epilogue_equals_the_silu_kernel(config, rows):
    mods = [_Module(1024, 2048, True), _Module(1024, 2048, True)]  # [gate; up]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    fused = G.nf4_matmul(x, w, config=config, act="silu")
    assert fused.shape == (rows, 1024) and fused.dtype == torch.bfloat16
    assert torch.equal(fused, K.gated_act(G.nf4_matmul(x, w, config=config), torch.bfloat16))
    with pytest.raises(ValueError, match="split-K"):
        G.nf4_matmul(x, w, config=(32, 256, 4, 4, True, True, True), act="silu")


@pytest.mark.parametrize("config", [(16, 1024, 8, 1, True, True, True), (64, 128, 2, 1, False, False, False)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_nf4_gemv_rope_epilogue_equals_the_rope_kernel(config, rows):
    H, KV, D, S, C = 32, 8, 128, 5, 64
    mods = [_Module(H * D, 4096, True), _Module(KV * D, 4096, True), _Module(KV * D, 4096, True)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    cos, sin = (torch.rand(C, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    positions = torch.tensor([3, 0, 63, 9][:rows], dtype=torch.int32, device="cuda")
    slots = torch.tensor([1, 4, 0, 2][:rows], dtype=torch.int32, device="cuda")
    caches = [torch.zeros(S, KV, C, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    fused = G.nf4_matmul(x, w, config=config, rope=G.Rotary(cos, sin, positions, slots, caches[0], caches[1], H, KV, D))
    apart = K.rope_kv(G.nf4_matmul(x, w, config=config), cos, sin, positions, slots, caches[2], caches[3], H, KV, D)
    assert torch.equal(fused, apart) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


class _Int8Module:
    """bitsandbytes' int8 inference weights, quantized by bitsandbytes."""

    def __init__(self, n, k):
        w = torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
        cb, scb, _ = BF.int8_vectorwise_quant(w)
        self.weight = torch.nn.Parameter(cb, requires_grad=False)
        self.weight.SCB = scb
        self.bias = None
        self.ref = BF.int8_vectorwise_dequant(cb, scb)  # fp32


@pytest.mark.parametrize("config", [None, (16, 512, 4, 1), (32, 256, 4, 4), (64, 1024, 8, 2)])
@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_int8_matmul_matches_bitsandbytes_dequantize(config, rows):
    mods = [_Int8Module(2048, 4096), _Int8Module(1024, 4096)]
    w = G.Int8Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros((rows, w.n), device="cuda") if rows <= 4 else None
    ref = x.float() @ torch.cat([m.ref for m in mods]).T
    assert rel(G.int8_matmul(x, w, out=out, config=config if rows <= 4 else None), ref) < 1e-2


@pytest.mark.parametrize("rows", [1, 4])
def test_nf4_gemv_with_fp16_activations(rows):
    mods = [_Module(1024, 2048, False)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, dtype=torch.float16, device="cuda")
    assert rel(G.nf4_matmul(x, w), x.float() @ mods[0].ref.float().T) < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_bias_and_dequantize(quant_type):
    mods = [_Module(256, 512, True, bias=True, quant_type=quant_type),
            _Module(128, 512, True, bias=True, quant_type=quant_type)]
    w = G.NF4Weights(mods)
    x = torch.randn(3, 512, dtype=torch.bfloat16, device="cuda")
    full = torch.cat([m.ref for m in mods])
    bias = torch.cat([m.bias for m in mods])
    assert rel(G.nf4_matmul(x, w), x @ full.T + bias) < 1e-2
    scratch = torch.full((w.n * w.k,), float("nan"), dtype=torch.bfloat16, device="cuda")
    assert torch.equal(G.nf4_dequantize(w, scratch), full)  # every element written, bit-exact
