"""The quantized GEMVs (gemv.py) on the CPU, in Triton's interpreter (tests/triton_cpu.py: inline
PTX emulated), against bitsandbytes' CPU dequantize and the separate kernels their epilogues
replace: the GEMVs run as written (their relabeled tables, index math, split-K, epilogues).
A GPU runs the real thing: test_cuda_gemv."""

import pytest
import torch
from triton_cpu import interpreted  # skips this module where the interpreter cannot run the kernels

from daemon.engine.cuda import gemv as G
from daemon.engine.cuda import kernels as K

functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def emulated_ptx(monkeypatch):
    interpreted(monkeypatch, G)


class _Param:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _Module:
    def __init__(self, n, k, double, gen, quant_type="nf4"):
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        q, st = functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        self.weight, self.bias = _Param(q, st), None
        self.ref = functional.dequantize_4bit(q, st)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# (BLOCK_N, BLOCK_K, warps, split-K, x as vectors, packed bf16, prefetch)
CONFIGS = [(16, 256, 4, 1, True, True, True), (16, 128, 4, 2, True, True, False), (32, 128, 4, 1, False, True, True),
           (16, 256, 4, 1, False, False, True)]


@pytest.mark.parametrize("config", CONFIGS, ids=["vector x", "split-K", "scalar x", "fp32 weights"])
@pytest.mark.parametrize("rows, double, quant_type", [(1, True, "nf4"), (3, False, "nf4"), (2, True, "fp4")])
def test_nf4_gemv_matches_bitsandbytes(config, rows, double, quant_type):
    gen = torch.Generator().manual_seed(rows)
    mods = [_Module(64, 512, double, gen, quant_type), _Module(32, 512, double, gen, quant_type)]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    out = torch.zeros((rows, w.n))
    got = G.nf4_matmul(x, w, out=out, config=config)
    assert rel(got, x.float() @ torch.cat([m.ref for m in mods]).float().T) < 1e-2


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=["packed", "fp32 weights"])
@pytest.mark.parametrize("rows", [1, 2])
def test_nf4_gemv_activation_epilogue(config, rows, act):
    gen = torch.Generator().manual_seed(7)
    mods = [_Module(64, 256, True, gen), _Module(64, 256, True, gen)]  # [gate; up]
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    fused = G.nf4_matmul(x, w, config=config, act=act)
    gelu = act == "gelu_tanh"
    assert torch.equal(fused, K.gated_act(G.nf4_matmul(x, w, config=config), torch.bfloat16, gelu=gelu))
    gate, up = (x.float() @ m.ref.float().T for m in mods)
    reference = torch.nn.functional.gelu(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate)
    assert rel(fused, reference * up) < 2e-2


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[3]], ids=["packed", "split-K", "fp32 weights"])
@pytest.mark.parametrize("double", [True, False])
def test_a_routed_gemv_multiplies_each_pair_by_its_expert(config, double):
    """A MoE layer's experts stacked into one 4-bit matrix (as moe.py quantizes them: whole
    256-block groups per expert), each (token, expert) pair one output row: the down product
    (a row per pair) and [gate; up] with its activation (each token's row read by its top k)."""
    gen = torch.Generator().manual_seed(11)
    experts, n, k, top_k = 4, 128, 256, 2
    stacked = _Module(experts * n, k, double, gen)
    w = G.NF4Weights([stacked])
    chosen = torch.tensor([[2, 0], [3, 2], [1, 3]], dtype=torch.int32)  # 3 tokens, their top 2
    x = torch.randn(3 * top_k, k, generator=gen).to(torch.bfloat16)
    ref = stacked.ref.float().view(experts, n, k)
    got = G.nf4_matmul(x, w, config=config, routed=G.Routed(chosen.flatten(), n))
    want = torch.stack([x[p].float() @ ref[e].T for p, e in enumerate(chosen.flatten().tolist())])
    assert got.shape == (6, n) and rel(got, want) < 1e-2
    if config[3] > 1:
        return  # the activation epilogue needs whole sums in one program
    tokens = x[:3]
    gated = G.nf4_matmul(tokens, w, config=config, act="silu", routed=G.Routed(chosen.flatten(), n, per_x=top_k))
    both = torch.stack([tokens[p // top_k].float() @ ref[e].T for p, e in enumerate(chosen.flatten().tolist())])
    assert gated.shape == (6, n // 2)
    assert rel(gated, torch.nn.functional.silu(both[:, :n // 2]) * both[:, n // 2:]) < 2e-2


def test_a_routed_product_takes_its_own_sweeps_setting(monkeypatch):
    """A routed product's setting: its sweep's for the closest pair count (bench/nf4_kernel.py
    --routed), never a dense matrix's of the same shape; unswept, the dense shape's; and the
    product with the routed setting (split-K) is still right for 12 pairs, past the GEMV's 4 rows."""
    n, k = 128, 256
    dense, few, many = CONFIGS[0], CONFIGS[1], CONFIGS[3]
    monkeypatch.setattr(G, "GEMV_CONFIGS", {("gemv", n, k): dense, ("routed", n, k, 8): few,
                                            ("routed", n, k, 64): many})
    routed = lambda pairs: G.Routed(torch.zeros(pairs, dtype=torch.int32), n)  # noqa: E731
    table = [(routed(8), few), (routed(12), few), (routed(40), many), (routed(1), few), (None, dense)]
    for how, want in table:
        assert G._gemv_config(4 * n, k, 1, how) == want
    assert G._gemv_config(n, 512, 1, routed(8)) == G._config("gemv", n, 512, 1, G.GEMV_DEFAULT)
    gen = torch.Generator().manual_seed(5)
    stacked = _Module(4 * n, k, True, gen)
    w = G.NF4Weights([stacked])
    chosen = torch.randint(0, 4, (12,), generator=gen, dtype=torch.int32)
    x = torch.randn(12, k, generator=gen).to(torch.bfloat16)
    ref = stacked.ref.float().view(4, n, k)
    got = G.nf4_matmul(x, w, routed=G.Routed(chosen, n))
    assert rel(got, torch.stack([x[p].float() @ ref[e].T for p, e in enumerate(chosen.tolist())])) < 1e-2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_dequantize_is_bitsandbytes_bit_for_bit(quant_type):
    gen = torch.Generator().manual_seed(3)
    mods = [_Module(64, 256, True, gen, quant_type), _Module(32, 256, True, gen, quant_type)]
    w = G.NF4Weights(mods)
    scratch = torch.full((w.n * w.k,), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(G.nf4_dequantize(w, scratch), torch.cat([m.ref for m in mods]))


@pytest.mark.parametrize("config", [(16, 128, 4, 1, True, True, True), (32, 128, 4, 1, False, False, False)],
                         ids=["16 rows", "32 rows, fp32 weights"])
@pytest.mark.parametrize("rows", [1, 3])
def test_nf4_gemv_rope_epilogue_equals_the_rope_kernel(config, rows):
    gen = torch.Generator().manual_seed(5)
    H, KV, D, S, C = 4, 2, 64, 4, 16
    mods = [_Module(H * D, 128, True, gen), _Module(KV * D, 128, True, gen), _Module(KV * D, 128, True, gen)]
    for mod in mods:  # q/k/v biases, as qwen2 has them
        mod.bias = torch.randn(mod.ref.shape[0], generator=gen).to(torch.bfloat16)
    w = G.NF4Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    cos = torch.rand(C, D, generator=gen).to(torch.bfloat16)
    sin = torch.rand(C, D, generator=gen).to(torch.bfloat16)
    positions = torch.tensor([3, 0, 15][:rows], dtype=torch.int32)
    slots = torch.tensor([1, 3, 0][:rows], dtype=torch.int32)
    caches = [torch.zeros(S, KV, C, D, dtype=torch.bfloat16) for _ in range(4)]
    fused = G.nf4_matmul(x, w, config=config, rope=G.Rotary(cos, sin, positions, slots, caches[0], caches[1], H, KV, D))
    apart = K.rope_kv(G.nf4_matmul(x, w, config=config), cos, sin, positions, slots, caches[2], caches[3], H, KV, D)
    assert fused.shape == (rows, H, D) and torch.equal(fused, apart)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]) and caches[0].any()
    with pytest.raises(ValueError, match="within one head"):
        G.nf4_matmul(x, w, config=(128, 128, 4, 1, True, True, True),
                     rope=G.Rotary(cos, sin, positions, slots, caches[0], caches[1], H, KV, D))


class _Int8Module:
    """What bitsandbytes' Linear8bitLt holds for inference: int8 rows and their absmax (SCB)."""

    def __init__(self, n, k, gen, bias=False):
        w = torch.randn(n, k, generator=gen) * 0.02
        scb = w.abs().amax(dim=1)
        self.weight = torch.nn.Parameter(torch.round(w * 127 / scb[:, None]).to(torch.int8), requires_grad=False)
        self.weight.SCB = scb
        self.bias = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
        self.ref = self.weight.float() * (scb[:, None] * (1.0 / 127))


INT8_CONFIGS = [(16, 128, 4, 1), (32, 64, 4, 2), (16, 256, 2, 1)]


@pytest.mark.parametrize("config", INT8_CONFIGS, ids=["plain", "split-K", "long rows"])
@pytest.mark.parametrize("rows", [1, 4])
def test_int8_gemv_matches_the_dequantized_product(config, rows):
    gen = torch.Generator().manual_seed(11)
    mods = [_Int8Module(48, 256, gen, bias=True), _Int8Module(16, 256, gen, bias=True)]
    w = G.Int8Weights(mods)
    x = torch.randn(rows, w.k, generator=gen).to(torch.bfloat16)
    out = torch.zeros((rows, w.n))
    ref = x.float() @ torch.cat([m.ref for m in mods]).T + torch.cat([m.bias for m in mods]).float()
    assert rel(G.int8_matmul(x, w, out=out, config=config), ref) < 1e-4  # fp32 throughout


def test_int8_epilogues_dequantize_and_batches():
    gen = torch.Generator().manual_seed(12)
    halves = [_Int8Module(64, 128, gen), _Int8Module(64, 128, gen)]
    gate_up = G.Int8Weights(halves)
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16)
    setting = (16, 128, 4, 1)
    assert torch.equal(G.int8_matmul(x, gate_up, config=setting, act="silu"),
                       K.gated_act(G.int8_matmul(x, gate_up, config=setting), torch.bfloat16))
    H, KV, D, C = 2, 1, 32, 8
    qkv = G.Int8Weights([_Int8Module(H * D, 128, gen), _Int8Module(KV * D, 128, gen), _Int8Module(KV * D, 128, gen)])
    cos, sin = torch.rand(C, D, generator=gen).to(torch.bfloat16), torch.rand(C, D, generator=gen).to(torch.bfloat16)
    positions, slots = torch.tensor([2, 7], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    caches = [torch.zeros(2, KV, C, D, dtype=torch.bfloat16) for _ in range(4)]
    fused = G.int8_matmul(x, qkv, config=setting,
                          rope=G.Rotary(cos, sin, positions, slots, caches[0], caches[1], H, KV, D))
    apart = K.rope_kv(G.int8_matmul(x, qkv, config=setting), cos, sin, positions, slots, caches[2], caches[3],
                      H, KV, D)
    assert torch.equal(fused, apart) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    ref = torch.cat([m.ref for m in halves])
    full = gate_up.dequantize(torch.empty(gate_up.n * gate_up.k, dtype=torch.bfloat16))
    assert torch.equal(full, ref.to(torch.bfloat16))
    batch = torch.randn(6, 128, generator=gen).to(torch.bfloat16)  # more rows: dequantize, then one GEMM
    assert rel(G.int8_matmul(batch, gate_up), batch.float() @ ref.T) < 1e-2


def test_a_layer_without_int8_statistics_is_refused():
    layer = _Int8Module(16, 64, torch.Generator().manual_seed(1))
    layer.weight.SCB = None
    with pytest.raises(ValueError, match="not an int8 inference layer"):
        G.Int8Weights([layer])


@pytest.mark.parametrize("rows,expected", [(1, "one"), (2, "two"), (3, "four"), (4, "four")])
def test_settings_by_row_count(monkeypatch, rows, expected):
    table = {("int8", 64, 128): "one", ("int8", 64, 128, 2): "two", ("int8", 64, 128, 4): "four"}
    monkeypatch.setattr(G, "GEMV_CONFIGS", table)
    assert G._config("int8", 64, 128, rows, "default") == expected
    # a matrix never swept takes the closest swept one's; a path with none swept, the default
    table[("int8", 4096, 4096)] = "big"
    assert G._config("int8", 64, 256, rows, "default") == expected
    assert G._config("int8", 3840, 5120, rows, "default") == "big"
    assert G._config("gemv", 64, 128, rows, "default") == "default"
    monkeypatch.setattr(G, "GEMV_CONFIGS", {("int8", 64, 128): "one"})
    assert G._config("int8", 64, 128, rows, "default") == "one"
