"""A Llama-3-8B-shaped checkpoint with random weights, written to local disk (bf16
safetensors, a 128,256-word tokenizer, a plain chat template), for benchmarks on machines
that cannot download weights. Shapes decide speed; generation must be forced to full length.

    python bench/dummy_llama.py OUT_DIR [--layers 32]
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


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t128000", eos_token="t128009", unk_token="t0")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)


def write_checkpoint(out: Path, layers: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(out, max_shard_size="5GB")
    write_tokenizer(out, config.vocab_size)
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text())}, indent=1))
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    write_checkpoint(Path(args.out), args.layers)
