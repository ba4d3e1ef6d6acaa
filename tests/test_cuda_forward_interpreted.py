"""The GPU forward pass (its kernels without CUDA graphs) on the CPU, in Triton's interpreter
(tests/triton_cpu.py), on the tiny Llama with its products quantized by bitsandbytes' CPU
functions: the fast path's logits against PyTorch's own forward (ReferenceForward) on the same model
with the dequantized weights, through prompts, decode steps (GEMV epilogues or split-K), a pass
that mixes both (the batched product from 5 rows, 3 for int8), and the load-time warm-up. On a GPU, test_cuda_forward runs the real thing."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from triton_cpu import interpreted  # skips this module where the interpreter cannot run the kernels

from daemon.engine.cuda import forward as fast
from daemon.engine.cuda import gemv as G
from daemon.engine.forward import ReferenceForward
from daemon.engine.spec import UnsupportedArchitecture

functional = pytest.importorskip("bitsandbytes.functional")



class _Param:
    def __init__(self, data, **attrs):
        self.data = data
        self.dtype, self.shape = data.dtype, data.shape
        self.__dict__.update(attrs)

    def dim(self):
        return self.data.dim()


class _Quantized(torch.nn.Module):
    """What bitsandbytes' Linear4bit / Linear8bitLt hold: the weight as the kernels read it."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


def quantize(linear: torch.nn.Linear, kind: str) -> tuple[_Quantized, torch.Tensor]:
    """The layer as bitsandbytes stores it, and the weights it stands for (dequantized)."""
    w = linear.weight.detach()
    if kind == "int8":
        scb = w.float().abs().amax(dim=1)
        cb = torch.round(w.float() * 127 / scb[:, None]).to(torch.int8)
        return _Quantized(_Param(cb, SCB=scb), linear.bias), (cb.float() * (scb[:, None] * (1 / 127))).to(w.dtype)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=True)
    return _Quantized(_Param(packed, quant_state=state), linear.bias), functional.dequantize_4bit(packed, state)


PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


def models(path, kind):
    """(the model with quantized products, the same model with their dequantized weights)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        for part, names in PROJECTIONS:
            for name in names:
                quantized, weights = quantize(getattr(getattr(layer, part), name), kind)
                setattr(getattr(layer, part), name, quantized)
                getattr(getattr(ref_layer, part), name).weight.data.copy_(weights)
    return model, reference


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# the tiny model's products ((N, K): qkv, o, gate/up, down), as in test_cuda_forward
TINY_SHAPES = ((128, 64), (64, 64), (256, 64), (64, 128))
SETTINGS = {
    "epilogues": {shape: (16, 64, 4, 1) for shape in TINY_SHAPES},
    "split-K": {shape: (16, 64, 4, 2 if shape[1] == 128 else 1) for shape in TINY_SHAPES[1:]}
    | {TINY_SHAPES[0]: (32, 64, 4, 1)},  # 32 rows span two heads of 16: RoPE apart
}


@pytest.fixture
def cpu_fast_path(monkeypatch):
    interpreted(monkeypatch, G)
    monkeypatch.setattr(fast, "RUNS_ON", frozenset({"cpu", "cuda"}))


def run(forward) -> list[torch.Tensor]:
    """Logits of two prompts, three decode steps of both (two rows: bucket 2), then a pass with
    a decode row and a new prompt."""
    torch.manual_seed(0)
    prompts = [torch.randint(0, 300, (n,)) for n in (9, 3)]
    logits = [forward.forward(prompt[None], [slot], [0]) for slot, prompt in zip((0, 2), prompts)]
    for step in range(3):
        logits.append(forward.forward(torch.tensor([[5 + step], [7 + step]]), [0, 2], [9 + step, 3 + step]))
    chunk = torch.randint(0, 300, (6,)).tolist()
    if isinstance(forward, fast.FastForward):
        logits.append(forward.forward_mixed(torch.tensor([[11]]), [0], [12], [(chunk, 1, 0)]))
    else:
        logits.append(torch.cat([forward.forward(torch.tensor([[11]]), [0], [12]),
                                 forward.forward(torch.tensor([chunk]), [1], [0])]))
    return logits


@pytest.mark.parametrize("kind, setting", [("nf4", "epilogues"), ("nf4", "split-K"), ("fp4", "epilogues"),
                                           ("int8", "epilogues"), ("int8", "split-K")])
def test_fast_path_logits_match_pytorch_on_the_same_weights(tiny_dirs, cpu_fast_path, monkeypatch, kind, setting):
    for (n, k), (block_n, block_k, warps, split) in SETTINGS[setting].items():
        monkeypatch.setitem(G.GEMV_CONFIGS, ("gemv", n, k), (block_n, block_k, warps, split, True, True, True))
        monkeypatch.setitem(G.GEMV_CONFIGS, ("int8", n, k), (block_n, block_k, warps, split))
    model, reference = models(tiny_dirs["random"], kind)
    ours = fast.FastForward(model, num_slots=3, max_ctx=64, graphs=False)
    assert all(lin.quantized is not None for lin in (ours.layers[0].qkv, ours.layers[1].down))
    first = ours.layers[0]  # gate/up (K = 64) never splits: SiLU is fused in both settings
    assert first.qkv.fuses_rope(2, 16) == (setting == "epilogues") and first.gate_up.fuses_act(2)
    assert first.down.adds(2) == (setting == "split-K")
    # the 9-token prompt and the 7-row mixed pass multiply through the batched product (no scratch
    # dequantization); int8 takes it from 3 rows, 4-bit from 5
    assert [first.qkv.route(rows) for rows in (2, 3, 7, 9)] == (["gemv", "batched", "batched", "batched"]
                                                             if kind == "int8" else ["gemv", "gemv", "batched", "batched"])
    ours.capture_all()  # as a load does (graphs off: the buckets' buffers, and the prompt path's kernels)
    got, expected = run(ours), run(ReferenceForward(reference, num_slots=3, max_ctx=64))
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert rel(g, e) < 3e-2
    if setting == "epilogues":  # RoPE and SiLU in the GEMVs' epilogues compute what their own kernels do
        monkeypatch.setattr(fast.Linear, "fuses_rope", lambda self, rows, head_dim: False)
        monkeypatch.setattr(fast.Linear, "fuses_act", lambda self, rows: False)
        apart = fast.FastForward(models(tiny_dirs["random"], kind)[0], num_slots=3, max_ctx=64, graphs=False)
        assert all(torch.equal(g, a) for g, a in zip(got, run(apart)))
        assert all(torch.equal(a, b) for a, b in zip(ours.k_cache + ours.v_cache, apart.k_cache + apart.v_cache))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import families

    root = tmp_path_factory.mktemp("fast-families")
    return {f: families.build(root / f, f) for f in families.FAMILIES + families.MOE}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-mm", "phi3", "phi4-mini",
                                    "mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_each_family_on_the_fast_path_decodes_greedy_as_transformers_generate(family_dirs, cpu_fast_path, family):
    """The fast path's kernels (norms with the family's style, q/k norms, partial rotary, windows,
    soft-caps, GELU; a head size of 24 for Phi-3) in the interpreter, in fp32 so that greedy
    decoding must agree token for token with transformers' generate(); and passes mixing a
    decode row with a new prompt's chunk (long: the prompt path; short: rows of a decode step)
    within tolerance of the reference path."""
    import families

    path = family_dirs[family]
    expected = families.hf_greedy(path)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    ours = fast.FastForward(load(), num_slots=3, max_ctx=64, graphs=False)
    assert families.our_greedy(ours, companion=False) == expected  # batched rows: the mixed pass below
    reference = ReferenceForward(load(), num_slots=3, max_ctx=64, weight_dtype=torch.float32)
    for f in (ours, reference):
        f.forward(torch.tensor([families.PROMPT]), [2], [0])
    chunk = (families.PROMPT * 2)[3:20]
    mixed = ours.forward_mixed(torch.tensor([[7]]), [2], [len(families.PROMPT)], [(chunk, 1, 0)])
    alone = torch.cat([reference.forward(torch.tensor([[7]]), [2], [len(families.PROMPT)]),
                       reference.forward(torch.tensor([chunk]), [1], [0])])
    assert rel(mixed, alone) < 1e-4
    # a prompt's last few tokens (what the prefix cache leaves) ride one decode step as rows
    tail = [5, 9]
    short = ours.forward_mixed(torch.tensor([[8]]), [2], [len(families.PROMPT) + 1], [(tail, 1, len(chunk))])
    alone = torch.cat([reference.forward(torch.tensor([[8]]), [2], [len(families.PROMPT) + 1]),
                       reference.forward(torch.tensor([tail]), [1], [len(chunk)])])
    assert short.shape == alone.shape and rel(short, alone) < 1e-4
    # prompts taking the rest of a copied prefix in one pass: two from the same start, in slots
    # out of order (attended together), one from another start (alone)
    start = len(families.PROMPT)
    for f in (ours, reference):
        f.copy_prefix(2, [0, 1], start)
    chunks = [((families.PROMPT * 2)[:5], 1, start), ([4, 6, 8], 0, start), ([9, 3, 2, 5], 2, start + 2)]
    together = ours.forward_mixed(torch.empty((0, 1), dtype=torch.long), [], [], chunks)
    alone = torch.cat([reference.forward(torch.tensor([ids]), [slot], [at]) for ids, slot, at in chunks])
    assert together.shape == alone.shape and rel(together, alone) < 1e-4


def test_every_product_of_a_prompt_pass_meets_a_bucketed_row_count(tiny_dirs, cpu_fast_path, monkeypatch):
    """cuBLAS's first meeting with a row count costs milliseconds on a GPU: a prompt pass's rows
    and the rows it takes logits of come in multiples of PROMPT_ROWS, whatever its lengths, and
    the padding changes no result."""
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_dirs["random"], dtype=torch.float32).eval()  # noqa: E731
    ours = fast.FastForward(load(), num_slots=3, max_ctx=64, graphs=False, prompt_rows=fast.PROMPT_ROWS)
    reference = ReferenceForward(load(), num_slots=3, max_ctx=64, weight_dtype=torch.float32)
    seen, call = [], fast.Linear.__call__
    monkeypatch.setattr(fast.Linear, "__call__", lambda self, x, *a, **k: (seen.append(x.shape[0]), call(self, x, *a, **k))[1])
    torch.manual_seed(1)
    for n in (7, 13, 29):
        ids = torch.randint(0, 300, (n,))
        got = ours.forward(ids[None], [0], [0])
        torch.testing.assert_close(got, reference.forward(ids[None], [0], [0]), atol=1e-4, rtol=1e-4)
    assert seen and all(rows % fast.PROMPT_ROWS == 0 for rows in seen), sorted(set(seen))


def test_padding_rows_leave_an_embedding_in_the_scratch_slot_alone(tiny_dirs, cpu_fast_path):
    """encode() runs in the scratch slot, where a pass's padding rows write their keys: they go
    to its last position, which an encode of fewer tokens never reads, and none when it does."""
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_dirs["random"], dtype=torch.float32).eval()  # noqa: E731
    padded = fast.FastForward(load(), num_slots=2, max_ctx=70, graphs=False, prompt_rows=fast.PROMPT_ROWS)
    plain = fast.FastForward(load(), num_slots=2, max_ctx=70, graphs=False)
    torch.manual_seed(2)
    for n in (5, 70):
        ids = torch.randint(0, 300, (n,))
        torch.testing.assert_close(padded.encode(ids), plain.encode(ids), atol=1e-4, rtol=1e-4)



def moe_models(path):
    """A MoE model as bitsandbytes loads it in 4-bit (attention, shared expert and its gate
    quantized, and the dense MLP of any layer that is not sparse; the stacked experts left in
    bf16), and the same model on the weights that stands for, its experts quantized and
    dequantized as the fast path quantizes them (each on its own)."""
    import families

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # decisive routers, as trained ones are: near-tied experts would flip on bf16 noise
        for router in families.routers(model):
            router.weight.mul_(4)
    reference = copy.deepcopy(model)
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        linears = [(layer.self_attn, ref_layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shared = getattr(layer.mlp, "shared_expert", None)
        if not hasattr(layer.mlp, "experts"):  # a dense layer between sparse ones (decoder_sparse_step)
            linears += [(layer.mlp, ref_layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        elif shared is not None:
            linears += [(shared, ref_layer.mlp.shared_expert, n) for n in ("gate_proj", "up_proj", "down_proj")]
            linears.append((layer.mlp, ref_layer.mlp, "shared_expert_gate"))
        for holder, ref_holder, name in linears:
            quantized, weights = quantize(getattr(holder, name), "nf4")
            setattr(holder, name, quantized)
            getattr(ref_holder, name).weight.data.copy_(weights)
    families.quantize_dequantize_experts(reference)
    return model, reference


@pytest.mark.parametrize("routed_rows,grouped_from", [(64, float("inf")), (64, 0.0), (4, 1.0)],
                         ids=["routed GEMVs", "grouped decode", "long passes past 4 rows"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_4bit_experts_match_pytorch_on_the_same_weights(family_dirs, cpu_fast_path, monkeypatch, family, routed_rows,
                                                        grouped_from):
    """The fast path quantizes the experts bitsandbytes left in bf16 and multiplies each token's
    experts from their 4-bit bytes (small batches: the routed GEMVs; batches of many pairs and
    long passes: each expert's tiles of pairs, batched.grouped_matmul; past ROUTED_ROWS the
    router's logits by cuBLAS), within bf16 tolerance of PyTorch on the weights that stands for;
    the experts cost 4-bit bytes."""
    from daemon.engine.cuda import moe

    monkeypatch.setattr(moe, "ROUTED_ROWS", routed_rows)
    monkeypatch.setattr(moe, "GROUPED_PAIRS_PER_EXPERT", grouped_from)
    model, reference = moe_models(family_dirs[family])
    ours = fast.FastForward(model, num_slots=3, max_ctx=64, graphs=False)
    experts = next(layer.experts for layer in ours.layers if layer.experts is not None)
    # double-quantized where an expert's blocks fill whole groups of 256 (Mixtral's here, every real shape)
    assert experts.quantized and experts.gate_up.double == (family == "mixtral")
    bf16_bytes = experts.count * 3 * experts.intermediate * experts.hidden * 2
    assert experts.nbytes < bf16_bytes * 0.35  # 4-bit codes, absmax, gpt-oss's fp32 biases
    ours.capture_all()
    if routed_rows == 4:
        experts.compile_long_passes()  # the GPU's capture_all runs it; the interpreter's stops before
    got, expected = run(ours), run(ReferenceForward(reference, num_slots=3, max_ctx=64))
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        assert rel(g, e) < 3e-2


@pytest.mark.parametrize("family", ["gemma3-vision", "llava", "llava-next", "qwen2.5-vl"])
def test_images_on_the_fast_path_match_the_reference_path(tmp_path, cpu_fast_path, family):
    """Prompts holding images on the fast path, in fp32: their tokens' rows from the tower's
    features and (Gemma 3) attending to each other, (Qwen2.5-VL) rotated by their time, row and
    column, two image prompts from the same start in one pass (attended together) beside a
    decode row, then a decode step, then the next turn's text (a few rows through the decode
    step) and a prefix copied to another slot and continued: the reference path's logits."""
    import hashlib

    from transformers import AutoModelForImageTextToText

    import visionmodels as vm
    from daemon.engine.images import ImageBytes
    from daemon.engine.vision import Vision

    path = vm.build(tmp_path / family, family)
    processor = vm.processor_of(path)
    paths = []
    for make in (lambda m: fast.FastForward(m, num_slots=3, max_ctx=128, graphs=False),
                 lambda m: ReferenceForward(m, num_slots=3, max_ctx=128, weight_dtype=torch.float32)):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        forward = make(model)
        forward.vision = Vision(model, processor, forward.vocab_size)
        paths.append(forward)
    prompts = []
    for forward in paths:
        ids = []
        for seed in (1, 2):
            data = vm.picture(seed=seed)
            tokens, pixels = forward.vision.prepare(ImageBytes(data, hashlib.sha256(data).hexdigest()))
            forward.vision.encode(tokens, pixels)
            ids.append([5, 9] + list(tokens.ids) + [17, 33, 65, 7])
        prompts.append(ids)
    assert forward.vision.bidirectional == (family == "gemma3-vision")
    results = []
    for forward, (a, b) in zip(paths, prompts):
        forward.forward(torch.tensor([[3, 4, 5]]), [2], [0])
        if isinstance(forward, fast.FastForward):
            first = forward.forward_mixed(torch.tensor([[6]]), [2], [3], [(a, 0, 0), (b, 1, 0)])
        else:
            first = torch.cat([forward.forward(torch.tensor([[6]]), [2], [3]), forward.forward(torch.tensor([a]), [0], [0]),
                               forward.forward(torch.tensor([b]), [1], [0])])
        step = forward.forward(torch.tensor([[8], [11]]), [0, 1], [len(a), len(b)])
        turn = [40, 41, 42]
        following = forward.forward_mixed(torch.tensor([[12]]), [1], [len(b) + 1], [(turn, 0, len(a) + 1)])
        forward.copy_prefix(0, [2], len(a))
        copied = forward.forward_mixed(torch.tensor([[9]]), [0], [len(a) + 1 + len(turn)], [(turn, 2, len(a))])
        results.append((first, step, following, copied))
    for got, expected in zip(*results):
        assert rel(got, expected) < 1e-4
    ref_first = results[1][0]
    assert rel(ref_first[1], ref_first[2]) > 1e-3  # the two pictures answer apart
