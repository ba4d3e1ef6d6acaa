"""Our forward pass against transformers' own, on the tiny random Llama."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from daemon.engine.forward import ReferenceForward
from daemon.engine.spec import UnsupportedArchitecture


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(tiny_dirs):
    model = load(tiny_dirs["random"])
    torch.manual_seed(0)
    prompts = [torch.randint(0, 300, (n,)) for n in (9, 5, 13)]
    with torch.no_grad():
        full = [model(torch.cat([p, torch.tensor([7, 8])])[None]).logits[0] for p in prompts]
    return prompts, full


@pytest.mark.parametrize("weight_dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_prefill_and_batched_decode_match_hf(tiny_dirs, reference, weight_dtype, tol):
    prompts, full = reference
    f = ReferenceForward(load(tiny_dirs["random"]), num_slots=4, max_ctx=64, weight_dtype=weight_dtype)
    slots = [2, 0, 3]
    last = []
    for slot, p in zip(slots, prompts):
        # prefill in two chunks to exercise the offset mask
        f.forward(p[:3][None], [slot], [0])
        last.append(f.forward(p[3:][None], [slot], [3]))
    for i, ref in enumerate(full):
        assert torch.allclose(last[i][0], ref[len(prompts[i]) - 1], atol=tol, rtol=tol)
    for step, token in enumerate((7, 8)):
        logits = f.forward(torch.tensor([[token]] * 3), slots, [len(p) + step for p in prompts])
        for i, ref in enumerate(full):
            assert torch.allclose(logits[i], ref[len(prompts[i]) + step], atol=tol, rtol=tol)


def test_single_sequence_decode_matches_batched(tiny_dirs, reference):
    prompts, full = reference
    f = ReferenceForward(load(tiny_dirs["random"]), num_slots=2, max_ctx=64, weight_dtype=torch.float32)
    f.forward(prompts[0][None], [1], [0])
    logits = f.forward(torch.tensor([[7]]), [1], [len(prompts[0])])
    assert torch.allclose(logits[0], full[0][len(prompts[0])], atol=1e-4)


def test_takes_over_the_layers_and_reports_sizes(tiny_dirs):
    model = load(tiny_dirs["random"])
    f = ReferenceForward(model, num_slots=2, max_ctx=32)
    assert not hasattr(model.model.layers[0].self_attn, "q_proj")  # fused copies replaced the originals
    assert f.weight_dtype == torch.float16 and f.dtype == torch.float32
    assert f.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 and f.weights_bytes > 0


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import families

    root = tmp_path_factory.mktemp("families")
    return {f: families.build(root / f, f) for f in families.FAMILIES + families.GENERIC + families.MOE}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-mm", "phi3", "phi4-mini",
                                    "mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_each_family_decodes_greedy_as_transformers_generate(family_dirs, family):
    """The reference path, driven by the family's spec, against transformers' own generate():
    32 greedy tokens after a prompt longer than the sliding windows, decoded beside another
    sequence."""
    import families

    expected = families.hf_greedy(family_dirs[family])
    f = ReferenceForward(load(family_dirs[family]), num_slots=2, max_ctx=128, weight_dtype=torch.float32)
    assert families.our_greedy(f) == expected


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt-oss"])
def test_a_prompt_over_several_key_spans_is_transformers_forward(family_dirs, family):
    """On the CPU a chunk is attended in groups cut where its rows' key spans change
    (forward.KEY_GRANULE), then decoded a row at a time: every position's logits of a prompt
    over three spans, with sliding windows, soft-caps and sinks, against transformers' forward."""
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (1, 300))
    with torch.no_grad():
        expected = load(family_dirs[family])(ids).logits[0]
    f = ReferenceForward(load(family_dirs[family]), num_slots=2, max_ctx=320, weight_dtype=torch.float32)
    chunk = f._logits(f._layers(ids[:, :290], [1], [0])[0])
    steps = [f.forward(ids[:, i:i + 1], [1], [i]) for i in range(290, 300)]
    assert torch.allclose(torch.cat([chunk, *steps]), expected, atol=1e-4, rtol=1e-4)


def test_gpt_oss_as_shipped_in_mxfp4_decodes_greedy_as_transformers_generate(tmp_path):
    """OpenAI's checkpoints keep the experts in MXFP4: dequantized at load (as the daemon's loader
    asks transformers to), the experts hold exactly the values their blocks code, and the
    reference path decodes as transformers' generate() on the same checkpoint."""
    import families
    from transformers import AutoModelForCausalLM, Mxfp4Config

    path, expected = families.build_mxfp4(tmp_path / "gpt-oss-mxfp4")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True)).eval()
    for name, values in expected.items():
        assert torch.equal(model.get_parameter(name).data, values), name
    want = families.hf_greedy(path, quantization_config=Mxfp4Config(dequantize=True))
    f = ReferenceForward(model, num_slots=2, max_ctx=128, weight_dtype=torch.float32)
    assert families.our_greedy(f) == want


def test_a_family_without_a_definition_is_named(family_dirs):
    with pytest.raises(UnsupportedArchitecture, match="no model definition for 'gpt2'"):
        ReferenceForward(load(family_dirs["gpt2"]), num_slots=1, max_ctx=8)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_a_mixture_of_experts_in_the_runner_alone_and_beside_another_request(family_dirs, family):
    """Routing is per token: a request's greedy text is the same alone and batched beside another
    (whose tokens pick other experts in the same step), with the prompt in chunks."""
    import asyncio

    import families
    from transformers import AutoTokenizer

    from daemon.engine.runner import Runner

    path = family_dirs[family]
    expected = families.hf_greedy(path, n=24)
    runner = Runner(ReferenceForward(load(path), num_slots=2, max_ctx=128, weight_dtype=torch.float32),
                    AutoTokenizer.from_pretrained(path), [], prefill_chunk=4)
    other = [40, 41, 42, 43, 44]
    try:
        alone_other = asyncio.run(families.runner_greedy(runner, other, 30))

        async def together():
            return await asyncio.gather(families.runner_greedy(runner, families.PROMPT, 24),
                                        families.runner_greedy(runner, other, 30))
        assert asyncio.run(together()) == [expected, alone_other]
    finally:
        runner.close()


@pytest.mark.parametrize("changes,sparse,error", [
    ({}, (True, True), None),
    ({"mlp_only_layers": [0]}, (False, True), None),
    ({"decoder_sparse_step": 2}, (False, True), None),
    ({"num_experts_per_tok": 17}, None, "17 of 16 experts per token"),
])
def test_the_experts_spec_reads_the_config(family_dirs, changes, sparse, error):
    from transformers import AutoConfig

    from daemon.engine.spec import FAMILIES, Experts

    config = AutoConfig.from_pretrained(family_dirs["qwen3-moe"])
    for key, value in changes.items():
        setattr(config, key, value)
    if error:
        with pytest.raises(UnsupportedArchitecture, match=error):
            Experts.of(config, FAMILIES["qwen3_moe"], 2)
        return
    experts = Experts.of(config, FAMILIES["qwen3_moe"], 2)
    assert (experts.count, experts.top_k, experts.normalize, experts.shared, experts.sparse) == (16, 4, True, False,
                                                                                                 sparse)


def test_a_mixture_of_experts_takes_its_experts_over_and_counts_them(family_dirs):
    model = load(family_dirs["mixtral"])
    f = ReferenceForward(model, num_slots=1, max_ctx=32)
    layer = f.layers[0]
    experts = 8 * 3 * 64 * 128 * 2  # 8 experts of 64 x 128 (gate, up, down), fp16 on the CPU
    assert layer.experts.gate_up.dtype == torch.float16 and layer.gate_up is None
    assert layer.nbytes == layer.qkv.nbytes + layer.o.nbytes + experts
    assert not hasattr(model.model.layers[0].mlp, "experts")  # the fp32 originals are gone
