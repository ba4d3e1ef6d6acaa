"""Checkpoints with the exact shapes of real models and random weights, written to local disk
(bf16 safetensors, a tokenizer of the model's vocabulary size, a plain chat template), for
benchmarks on machines that cannot download weights. Shapes decide speed; generation must be
forced to full length. The configs are the checkpoints' own (config.json on the Hub), to the
fields that decide the work: Meta-Llama-3-8B, Qwen3-8B, gemma-3-12b-it's text model, phi-4,
Qwen3-30B-A3B and gpt-oss-20b (mixtures of experts: EXPERTS_AT_LOAD).

    python bench/dummy_models.py OUT_DIR [--shape llama3-8b|qwen3-8b|gemma3-12b|phi4|qwen3-30b-a3b|gpt-oss-20b] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": 128009, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
        "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "gemma3-12b": {  # the language model of google/gemma-3-12b-it
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262208,
        "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "bos_token_id": 2, "eos_token_id": 106,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
    "phi4": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100352, "hidden_size": 5120,
        "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "max_position_embeddings": 16384, "rope_theta": 250000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "sliding_window": None, "bos_token_id": 100257, "eos_token_id": 100265, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B: 128 experts of 768, 8 per token, in every layer
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "gpt-oss-20b": {  # openai/gpt-oss-20b, its experts dequantized from MXFP4
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "rope_theta": 150000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0,
        "hidden_act": "silu", "bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}
# Mixtures of experts: their experts are left out of the checkpoint (Qwen3-30B-A3B's are 58 GB in
# bf16, over the lent machine's disk) and transformers initializes them at load as missing weights
# (normal, std 0.02): the same shapes and bytes on the GPU, no disk.
EXPERTS_AT_LOAD = ("qwen3-30b-a3b", "gpt-oss-20b")


def write_tokenizer(out: Path, vocab_size: int, bos: int = 1, eos: int = 2) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{bos}", eos_token=f"t{eos}", unk_token="t0")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)


def _fill(p, config, gen) -> None:
    if p.dim() == 1:
        p.fill_(0.0 if config.model_type.startswith("gemma") else 1.0)  # Gemma's norms scale by (1 + w)
    else:
        p.normal_(0.0, 0.02, generator=gen)


def _write_without_experts(model, out: Path) -> None:
    """Every weight but the stacked experts, as safetensors shards of up to 4 GB."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device="cuda").manual_seed(0)
    shard, size, index = {}, 0, {}

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard.clear()

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                continue
            tensor = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda")
            _fill(tensor, model.config, gen)
            if name.endswith("sinks") or name.endswith("bias"):
                tensor.normal_(0.0, 0.02, generator=gen)
            shard[name] = tensor.cpu()
            size += tensor.numel() * 2
            if size > 4 << 30:
                flush()
                size = 0
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    model.config.torch_dtype = "bfloat16"
    model.config.architectures = [type(model).__name__]  # save_pretrained would set it: the daemon reads it
    model.config.save_pretrained(out)


def write_checkpoint(out: Path, layers: int | None = None, shape: str = "llama3-8b") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in SHAPES[shape].items() if k not in ("architectures", "model_type", "torch_dtype")}
    if layers:
        fields["num_hidden_layers"] = layers
        if "layer_types" in fields:
            fields["layer_types"] = fields["layer_types"][:layers]
    config = AutoConfig.for_model(SHAPES[shape]["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if shape in EXPERTS_AT_LOAD:
        _write_without_experts(model, out)
    else:
        model = model.to_empty(device="cuda").to(torch.bfloat16)
        gen = torch.Generator(device="cuda").manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                _fill(p, config, gen)
        model.save_pretrained(out, max_shard_size="5GB")
    write_tokenizer(out, config.vocab_size, SHAPES[shape]["bos_token_id"], SHAPES[shape]["eos_token_id"])
    print(f"wrote {shape} to {out} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    write_checkpoint(Path(args.out), args.layers, args.shape)
