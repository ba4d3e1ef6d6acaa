"""A GGUF model for the CPU path, built from the file itself: the config from its metadata,
the tokenizer converted once and kept in the store, the weights from its blocks
(backends/gguf_weights.py) into an HF model whose linear layers are packed products.

The first load of the embedded default reads the header once (backends/gguf_meta.py, about
0.2 s for a 49k-token vocabulary), converts the tokenizer (transformers' GGUF tokenizer
builders, under a second) and packs the weights (about a second for 135M); later loads take
the tokenizer from the store. transformers' own GGUF path (backends/convert_gguf.py) parses the
file three times and writes a full-precision checkpoint first: it stays for the GPU, where
bitsandbytes quantizes that checkpoint, and for architectures this module does not read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from daemon.backends.gguf_meta import GGUFHeader, read_gguf_header
from daemon.backends.gguf_weights import LAYER_NORMS, LAYER_TENSORS, READ_ARCHITECTURES, GGUFWeights, unpermute_rows
from daemon.engine.packed import PackedLinear
from daemon.store.derived import DerivedCache

log = logging.getLogger(__name__)


def readable(header: GGUFHeader) -> bool:
    """Can this module build the model (else transformers' conversion does)?"""
    return header.metadata.get("general.architecture") in READ_ARCHITECTURES


def llama_config(header: GGUFHeader) -> Any:
    """The HF config a GGUF's metadata describes, through transformers' own table of
    llama.cpp's key names (integrations/ggml.py GGUF_CONFIG_MAPPING)."""
    from transformers import LlamaConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    meta = header.metadata
    arch = meta["general.architecture"]
    values: dict[str, Any] = {}
    for key, name in GGUF_CONFIG_MAPPING[arch].items():
        if f"{arch}.{key}" in meta and name is not None:
            values[name] = meta[f"{arch}.{key}"]
    if "rope_theta" in values:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": float(values.pop("rope_theta"))}
    embed = header.tensors["token_embd.weight"].shape
    values.setdefault("vocab_size", embed[1])
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            values[name] = int(meta[f"tokenizer.ggml.{key}"])
    return LlamaConfig(tie_word_embeddings="output.weight" not in header.tensors, **values)


def tokenizer_folder(path: Path, digest: str, cache: DerivedCache) -> Path:
    """The tokenizer converted from the GGUF (with its chat template), kept in the store."""
    def build(out: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        log.info("converting the tokenizer of %s (first load only)", path.name)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(out)

    return cache.get_or_build(f"gguf-tokenizer-{digest[:24]}", build, sources=[digest])


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def build_model(path: Path, header: GGUFHeader) -> torch.nn.Module:
    """An HF LlamaForCausalLM over the GGUF's weights: norms and the embedding in float32,
    every matrix a PackedLinear (or an nn.Linear where the file stores it as float)."""
    from transformers import AutoModelForCausalLM

    config = llama_config(header)
    with torch.device("meta"):  # no memory for weights that are replaced next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = GGUFWeights(path, header)
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its tables computed for real
    embed = weights.float("token_embd.weight")
    inner.embed_tokens.weight = _parameter(embed)
    inner.norm.weight = _parameter(weights.float("output_norm.weight"))
    q_rows = unpermute_rows(config.num_attention_heads * config.head_dim, config.num_attention_heads)
    k_rows = unpermute_rows(config.num_key_value_heads * config.head_dim, config.num_key_value_heads)
    for i, layer in enumerate(inner.layers):
        for gguf_name, (holder, attr) in LAYER_TENSORS.items():
            rows = q_rows if gguf_name == "attn_q" else k_rows if gguf_name == "attn_k" else None
            setattr(getattr(layer, holder), attr, _linear(weights, f"blk.{i}.{gguf_name}.weight", rows))
        for gguf_name, attr in LAYER_NORMS.items():
            getattr(layer, attr).weight = _parameter(weights.float(f"blk.{i}.{gguf_name}.weight"))
    head = "output.weight" if weights.has("output.weight") else "token_embd.weight"
    model.lm_head = _linear(weights, head, None)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"the GGUF does not fill {left[:3]}")
    return model.eval()


def _linear(weights: GGUFWeights, name: str, rows) -> torch.nn.Module:
    product = weights.product(name, rows)
    if isinstance(product, torch.Tensor):
        linear = torch.nn.Linear(product.shape[1], product.shape[0], bias=False)
        linear.weight = _parameter(product)
        return linear
    return PackedLinear(product)


def weights_bytes(model: torch.nn.Module) -> int:
    """What the weights hold: packed products at their packed size, float tensors as they are."""
    packed = sum(m.product.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    dense = {t.data_ptr(): t.numel() * t.element_size() for t in model.parameters()}
    return packed + sum(dense.values())


def load(path: Path, digest: str, cache: DerivedCache) -> tuple[torch.nn.Module, Any] | None:
    """The model and its tokenizer; None for an architecture this module does not read."""
    from transformers import AutoTokenizer

    header = read_gguf_header(path)
    if not readable(header):
        return None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path, digest, cache))
    return build_model(path, header), tokenizer
