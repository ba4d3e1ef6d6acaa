"""Convert a GGUF file into an HF folder (config, safetensors, tokenizer with its chat
template) through transformers' GGUF loader. Run as a subprocess by the loader:

    python -m daemon.backends.convert_gguf FILE.gguf OUT_DIR [DTYPE]

transformers' GGUF path parses the file in pure Python for tens of seconds; in its own
process it cannot starve the daemon's event loop, and its memory goes back when it ends.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(gguf_path: Path, out_dir: Path, dtype_name: str = "float32") -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The weights are dequantized now: what we save is a plain HF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "float32")
