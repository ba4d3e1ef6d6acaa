"""Tiny random models of each family, built from the real configs of the checkpoints people run
(scaled down: few layers, narrow, a vocabulary of the tests' tokenizer; widths stay multiples of
64, as bitsandbytes' blocks and real checkpoints have them), saved in HF format
with a tokenizer and chat template, so `from_pretrained` runs for real and outputs can be
compared with transformers' own `generate()`.

What each keeps from its real config is what makes the family differ: Qwen3's q/k norms,
Qwen2's q/k/v biases, Gemma 2's soft-caps, sandwich norms, GELU and alternating windows,
Gemma 3's 5:1 local/global layers with their two rotary bases and linear scaling, Phi-3's
fused projections (with a head size that is not a power of two) and Phi-4-mini's partial
rotary, Mistral v0.1's sliding window; the mixtures of experts' routers (Mixtral's renormalized
top 2 in fp32, Qwen3-MoE's renormalized top k cast to the compute dtype, Qwen2-MoE's
unnormalized weights and shared expert behind a sigmoid gate; gpt-oss's biased router softmaxing
its top k, interleaved biased experts with a clamped SwiGLU, attention sinks, yarn RoPE and
alternating windows). Windows are scaled down with everything else, so the
tests' prompts run past them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tinymodels import CHATML, build_tokenizer

WINDOW = 8  # sliding windows, scaled down: the tests' prompts and answers run past them


def _common(vocab: int, tok) -> dict:
    return dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=512)


def configs(vocab: int, tok) -> dict[str, object]:
    """family -> its config (the real checkpoint named, its distinguishing values kept)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    c = _common(vocab, tok)
    return {
        # Meta-Llama-3-8B: GQA 4:1, rope_theta 500000, eps 1e-5
        "llama": LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5, **c),
        # Mistral-7B-v0.1: a 4,096 sliding window on every layer
        "mistral": MistralConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, sliding_window=WINDOW, rms_norm_eps=1e-5, **c),
        # Qwen2.5-7B-Instruct: q/k/v biases, rope_theta 1e6, no sliding window in use
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             use_sliding_window=False, tie_word_embeddings=False, **c),
        # Qwen3-8B: per-head q/k norms, explicit head_dim 128 (here 16), rope_theta 1e6
        "qwen3": Qwen3Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, **c),
        # gemma-2-9b-it: (1 + w) norms, sandwich norms, GELU-tanh, embeddings times sqrt(hidden),
        # head_dim 256 (here 32) with query_pre_attn_scalar 256 (here 24), scores capped at 50,
        # logits at 30, sliding and global layers alternating, tied embeddings
        "gemma2": Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=WINDOW,
                               hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                               layer_types=["sliding_attention", "full_attention"], **c),
        # gemma-3-12b-it (its text model): local and global layers (five to one there, one to one
        # here), rope_theta 1e6 with linear scaling 8 on global layers and 10,000 on local ones,
        # q/k norms
        "gemma3": Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                                   sliding_window=WINDOW, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                   rope_scaling={"rope_type": "linear", "factor": 8.0}, **c),
        # Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj, head_dim 96 (here 24: not a
        # power of two either), a 2,047 sliding window
        "phi3": Phi3Config(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=8, sliding_window=WINDOW, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, **c),
        # Phi-4-mini-instruct: partial rotary (0.75 of each head), GQA 3:1, tied embeddings
        "phi4-mini": Phi3Config(hidden_size=192, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=2, sliding_window=None, rms_norm_eps=1e-5,
                                partial_rotary_factor=0.75, tie_word_embeddings=True, **c),
    }


def moe_configs(vocab: int, tok) -> dict[str, object]:
    """Mixtures of experts (engine/spec.py's Experts), scaled down like the rest."""
    from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    c = _common(vocab, tok)
    return {
        # Mixtral-8x7B-Instruct-v0.1: 8 experts, top 2 renormalized, GQA 4:1, rope_theta 1e6, no window
        "mixtral": MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2,
                                 rope_theta=1000000.0, sliding_window=None, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False, **c),
        # Qwen3-30B-A3B: 128 experts (here 16), top 8 (here 4) renormalized, narrow experts
        # (moe_intermediate_size 768, here 64), q/k norms, head_dim 128 (here 16)
        "qwen3-moe": Qwen3MoeConfig(hidden_size=64, intermediate_size=192, moe_intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                    decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1000000.0,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False, **c),
        # Qwen1.5-MoE-A2.7B: 60 experts (here 8), top 4 (here 2) not renormalized, a shared expert
        # behind a sigmoid gate, q/k/v biases; its second layer dense here (mlp_only_layers, as
        # models with dense first layers have them)
        "qwen2-moe": Qwen2MoeConfig(hidden_size=64, intermediate_size=192, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                                    use_sliding_window=False, rms_norm_eps=1e-6, tie_word_embeddings=False, **c),
        # gpt-oss-20b: 32 experts (here 8), top 4 (here 2) of a biased router, softmaxed after the
        # top k; experts as wide as the model (2,880), interleaved gate / up with biases, SwiGLU
        # clamped at 7; attention sinks, q/k/v/o biases, GQA 8:1 (here 2:1), head_dim 64 (here
        # 16), sliding (128, here 8) and full layers alternating, yarn RoPE (factor 32 over 4,096);
        # the clamp scaled down with the activations (here about 0.6 across), so that it bites
        "gpt-oss": GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 16},
                                swiglu_limit=0.5, attention_bias=True, rms_norm_eps=1e-5,
                                tie_word_embeddings=False, **c),
    }


def _with_multimodal(table: dict) -> dict:
    """gemma-3-4b-it as Google ships it ("gemma3-mm"): the multimodal checkpoint (a SigLIP tower,
    tiny here) around "gemma3", whose text runs on its language model."""
    from transformers import Gemma3Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    table["gemma3-mm"] = Gemma3Config(text_config=table["gemma3"].to_dict(), vision_config=vision,
                                      mm_tokens_per_image=4, image_token_index=table["gemma3"].vocab_size - 1)
    return table


def generic_configs(vocab: int, tok) -> dict[str, object]:
    """Architectures with no model definition here: they run through transformers' forward."""
    from transformers import FalconConfig, GPT2Config, OPTConfig

    ids = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return {
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=512, **ids),
        "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                               multi_query=True, parallel_attn=True, **ids),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-mm", "phi3", "phi4-mini")
GENERIC = ("gpt2", "opt", "falcon")
MOE = ("mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss")


def build(out: Path, family: str, seed: int = 0) -> Path:
    """A tiny random model of `family` saved at `out` (weights scaled so that logits spread)."""
    tok = build_tokenizer(template=CHATML)
    table = {**_with_multimodal(configs(len(tok), tok)), **generic_configs(len(tok), tok),
             **moe_configs(len(tok), tok)}
    config = table[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith("sinks"):  # logits in the range of the scores, so that they matter
                p.uniform_(-1.0, 1.0)
            elif "norm" in name or "ln" in name:
                p.uniform_(0.8, 1.2) if config.model_type not in ("gemma2", "gemma3_text") else p.uniform_(-0.2, 0.2)
            else:
                p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None  # greedy runs are full length
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# MXFP4's code points (OCP Microscaling FP4, E2M1): the low nibble is the first of a byte's two values
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def build_mxfp4(out: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny gpt-oss as OpenAI ships it: the experts in MXFP4 (per output row, blocks of 32 FP4
    values along the input, two a byte, and a power-of-two scale per block, E8M0 with bias
    127: `<name>_blocks` [experts, out, in / 32, 16], `<name>_scales` [experts, out, in / 32]), the rest
    as they are. Returns the folder and the experts' values, decoded here, in HF's layout."""
    import json

    from safetensors.torch import load_file, save_file

    path = build(out, "gpt-oss", seed)
    tensors = load_file(path / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    expected = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, k, n = tensors.pop(name).shape  # HF's layout: [experts, in, out]
        codes = torch.randint(0, 16, (experts, n, k // 32, 32), generator=gen, dtype=torch.uint8)
        scales = torch.randint(127 - 6, 127 - 3, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
        values = torch.tensor(FP4_VALUES)[codes.long()] * torch.exp2(scales.float() - 127)[..., None]
        tensors[name + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
        tensors[name + "_scales"] = scales
        expected[name] = values.reshape(experts, n, k).transpose(1, 2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path, expected


PROMPT = [5, 9, 17, 33, 65, 129, 200, 7, 77, 150, 3, 42]  # longer than the windows


def routers(model):
    """Each MoE layer's router module (gpt-oss calls it `router`, the others `gate`)."""
    return [getattr(layer.mlp, "router", None) or layer.mlp.gate for layer in model.model.layers
            if hasattr(layer.mlp, "experts")]


def decisively_routed(reference_pass, margin: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A ReferenceForward pass's logits and, per row, whether every layer's router chose its
    experts by more than `margin` (the k-th logit over the next): a near-tie (two experts one
    bf16 step apart, as random tiny routers make now and then) flips on the paths' summation
    order alone, so a row routed on it says nothing about the path under test."""
    from daemon.engine import forward

    chosen = forward.route
    margins = []

    def recording(x, router, moe, bias=None):
        logits = torch.nn.functional.linear(x, router, bias).float().reshape(-1, router.shape[0])
        ranked = logits.topk(moe.top_k + 1, dim=-1).values
        margins.append(ranked[:, -2] - ranked[:, -1])
        return chosen(x, router, moe, bias)

    forward.route = recording
    try:
        logits = reference_pass()
    finally:
        forward.route = chosen
    return logits, torch.stack(margins).amin(dim=0) > margin


def quantize_dequantize_experts(model, quant_type: str = "nf4") -> None:
    """The model's experts as the fast path stands for them, in place: each expert's matrices,
    in the layout the fast path takes them over in (spec.ExpertWeights: gpt-oss's de-interleaved
    and transposed), through bitsandbytes' 4-bit (double quant, blocks of 64) and back."""
    import bitsandbytes.functional as BF

    from daemon.engine.spec import ExpertWeights

    def round_trip(stack):
        out = torch.empty_like(stack)
        for e, matrix in enumerate(stack):
            packed, state = BF.quantize_4bit(matrix.contiguous(), blocksize=64, quant_type=quant_type,
                                             compress_statistics=True)
            out[e] = BF.dequantize_4bit(packed, state)
        return out

    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        interleaved = model.config.model_type == "gpt_oss"
        weights = ExpertWeights.of(experts, interleaved)
        gate_up, down = round_trip(weights.gate_up), round_trip(weights.down)
        if interleaved:  # back to [experts, hidden, 2I], gate and up alternating; down [experts, I, hidden]
            half = gate_up.shape[1] // 2
            experts.gate_up_proj.data[:, :, 0::2] = gate_up[:, :half].transpose(1, 2)
            experts.gate_up_proj.data[:, :, 1::2] = gate_up[:, half:].transpose(1, 2)
            experts.down_proj.data.copy_(down.transpose(1, 2))
        else:
            experts.gate_up_proj.data.copy_(gate_up)
            experts.down_proj.data.copy_(down)


def hf_greedy(path: Path, n: int = 32, dtype=torch.float32, **load) -> list[int]:
    """transformers' own generate(): greedy, full length (`load`: more from_pretrained arguments)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def our_greedy(forward, n: int = 32, slot: int = 1, companion: bool = True) -> list[int]:
    """The same on one of our paths: the prompt in two chunks (the second attends to the first
    through the cache), then one decode step per token; with `companion`, beside a second
    sequence in another slot (so the steps run batched where a path batches)."""
    forward.forward(torch.tensor([PROMPT[:5]]), [slot], [0])
    logits = forward.forward(torch.tensor([PROMPT[5:]]), [slot], [5])
    other_token = int(forward.forward(torch.tensor([[11, 12, 13]]), [0], [0])[0].argmax()) if companion else None
    out = []
    for step in range(n):
        token = int(logits[0].argmax())
        out.append(token)
        if step == n - 1:
            break
        if companion:
            both = forward.forward(torch.tensor([[token], [other_token]]), [slot, 0], [len(PROMPT) + step, 3 + step])
            logits, other_token = both[:1], int(both[1].argmax())
        else:
            logits = forward.forward(torch.tensor([[token]]), [slot], [len(PROMPT) + step])
    return out


async def runner_greedy(runner, prompt: list[int], n: int) -> list[int]:
    """A greedy request of n tokens through a Runner: the tokens it generated."""
    from daemon.engine.params import GenerationRequest, SamplingParams

    tokens: list[int] = []
    async for chunk in runner.generate(GenerationRequest(tuple(prompt), SamplingParams(temperature=0.0),
                                                         max_new_tokens=n)):
        if chunk.done:
            tokens = list(chunk.output_ids[len(prompt):])
    return tokens
