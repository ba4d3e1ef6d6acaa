"""What /api/show, /api/tags and /api/ps say about a model, read from its files without
loading it: GGUF headers, or an HF directory's config.json and safetensors headers."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.backends.gguf_meta import FILE_TYPES, read_gguf_header

# HF torch_dtype -> Ollama's quantization_level label for unquantized weights
_DTYPE_LABELS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_SAFETENSORS_DTYPE_LABELS = {"BF16": "BF16", "F16": "F16", "F32": "F32", "U8": "U8", "I8": "I8"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory: from config.json or GGUF metadata."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    # a mixture of experts: `sparse_layers` of the layers route each token over `experts` MLPs of
    # `expert_intermediate` (plus a shared one of `shared_intermediate`); the rest are dense
    experts: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: int = 0
    vision_params: int = 0  # a vision tower and projector, kept in the compute dtype

    @property
    def linear_params(self) -> int:
        """Parameters of the per-layer matrix products (what bitsandbytes quantizes): the
        attention, dense MLPs, shared experts; not the experts (expert_params)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        dense = (self.layers - self.sparse_layers) * 3 * self.hidden * self.intermediate
        return self.layers * attention + dense + self.sparse_layers * 3 * self.hidden * self.shared_intermediate

    @property
    def expert_params(self) -> int:
        """Parameters of every expert and router: stacked tensors that bitsandbytes leaves as they are."""
        return self.sparse_layers * self.experts * self.hidden * (3 * self.expert_intermediate + 1)

    @property
    def largest_product_params(self) -> int:
        """Parameters of a layer's largest fused product: q/k/v or gate/up."""
        return max(self.hidden * self.head_dim * (self.heads + 2 * self.kv_heads), 2 * self.hidden * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class ModelMetadata:
    format: str  # "gguf" | "safetensors"
    architecture: str  # general.architecture, e.g. "llama"
    parameter_count: int
    quantization_level: str
    context_length: int
    embedding_length: int
    chat_template: str | None
    is_embedding_model: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # Ollama's model_info keys
    shape: ModelShape | None = None
    vision: bool = False  # takes images: a vision tower and its processor's settings

    @property
    def families(self) -> list[str]:
        return [self.architecture]

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)

    @property
    def engine(self) -> str:
        """Whose decoder runs it: "hfollama" (its model definitions: the fast GPU path, or the
        reference path on the CPU) or "transformers" (transformers' own forward)."""
        from daemon.engine.spec import engine_for

        return "embedding" if self.is_embedding_model else engine_for(self.architecture)

    def details(self, quantization_level: str | None = None, parent_model: str = "") -> dict[str, Any]:
        return {
            "parent_model": parent_model,
            "format": self.format,
            "family": self.architecture,
            "families": self.families,
            "parameter_size": self.parameter_size,
            "quantization_level": quantization_level or self.quantization_level,
            "engine": self.engine,  # hfollama's: which decoder runs the model
        }


def human_number(n: int) -> str:
    """Go's format.HumanNumber: 8.0B, 134.52M, 567K."""
    for unit, scale, decimals in (("B", 1e9, 1), ("M", 1e6, 2), ("K", 1e3, 0)):
        if n >= scale:
            value = n / scale
            if value == int(value):
                return f"{int(value)}{unit}"
            return f"{value:.{decimals}f}{unit}"
    return str(n)


def read_metadata(location: Path, gguf_file: str | None = None) -> ModelMetadata:
    """Metadata of a GGUF file (location is the file, or a directory plus gguf_file) or an
    HF-format directory."""
    if gguf_file:
        location = location / gguf_file
    if location.is_file():
        return _from_gguf(location)
    return _from_hf_dir(location)


def _from_gguf(path: Path) -> ModelMetadata:
    header = read_gguf_header(path)
    kv = dict(header.metadata)
    arch = str(kv.get("general.architecture", "unknown"))
    template = kv.pop("tokenizer.chat_template", None)
    kv.pop("general.name", None)
    kv["general.parameter_count"] = header.parameter_count
    hidden = int(kv.get(f"{arch}.embedding_length", 0))
    heads = int(kv.get(f"{arch}.attention.head_count", 0) or 0)
    shape = None
    if hidden and heads:
        vocab = int(kv.get(f"{arch}.vocab_size", 0)) or header.tensor_shapes.get("token_embd.weight", (0, 0))[-1]
        shape = ModelShape(
            hidden=hidden, layers=int(kv.get(f"{arch}.block_count", 0)), heads=heads,
            kv_heads=int(kv.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(kv.get(f"{arch}.attention.key_length", 0) or hidden // heads),
            intermediate=int(kv.get(f"{arch}.feed_forward_length", 0)), vocab=int(vocab),
            tied_embeddings="output.weight" not in header.tensor_shapes)
    return ModelMetadata(
        format="gguf",
        architecture=arch,
        parameter_count=header.parameter_count,
        quantization_level=FILE_TYPES.get(int(kv.get("general.file_type", -1)), "unknown"),
        context_length=int(kv.get(f"{arch}.context_length", 0)),
        embedding_length=int(kv.get(f"{arch}.embedding_length", 0)),
        chat_template=template,
        is_embedding_model=arch in ("bert", "nomic-bert"),
        info=kv,
        shape=shape,
    )


# Where a multimodal checkpoint keeps its vision tower and projector (tensor names)
VISION_PARTS = ("vision_tower", "vision_model", "visual.", "multi_modal_projector", "mm_projector")


def _safetensors_params(directory: Path) -> tuple[int, str | None, int]:
    """Parameter count, the dominant dtype, and the vision tower's parameters, from the
    safetensors headers alone."""
    total = vision = 0
    by_dtype: dict[str, int] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in t["shape"]:
                count *= d
            total += count
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + count
            if any(part in name for part in VISION_PARTS):
                vision += count
    dominant = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return total, dominant, vision


def _hf_chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        f = directory / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
            if isinstance(template, list):  # named templates: take "default"
                for item in template:
                    if item.get("name") == "default":
                        return item.get("template")
    return None


# HF config key -> Ollama model_info suffix (after "<arch>.")
_INFO_KEYS = {
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "layer_norm_eps": "attention.layer_norm_epsilon",
    "vocab_size": "vocab_size",
    "num_local_experts": "expert_count",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
}


def _expert_shape(config: dict[str, Any]) -> dict[str, int]:
    """ModelShape's expert fields from an HF config (engine/spec.py's Experts reads the same keys)."""
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if not experts:
        return {}
    from daemon.engine.spec import sparse_layers

    sparse = sum(sparse_layers(int(config.get("num_hidden_layers", 0)), config.get("mlp_only_layers"),
                               config.get("decoder_sparse_step")))
    return dict(experts=experts, sparse_layers=sparse,
                expert_intermediate=int(config.get("moe_intermediate_size") or config.get("intermediate_size", 0)),
                shared_intermediate=int(config.get("shared_expert_intermediate_size") or 0))


def is_vision_checkpoint(folder: Path) -> bool:
    """A multimodal checkpoint with a processor: config.json names a vision tower, and the
    image processor's settings are there."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    processor = any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json"))
    if not (isinstance(config.get("vision_config"), dict) and processor):
        return False
    text = config.get("text_config") or config
    rope = text.get("rope_scaling") or text.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope, dict) and "mrope_section" in rope:
        # multimodal rotary positions (an image's tokens by row and column) as Qwen2-VL and
        # Qwen2.5-VL place them; Qwen3-VL interleaves the sections and feeds image features into
        # its middle layers too, which the decode paths do not: it serves text only
        return config.get("model_type") in ("qwen2_vl", "qwen2_5_vl") and not rope.get("mrope_interleaved")
    return True


def _from_hf_dir(directory: Path) -> ModelMetadata:
    config = json.loads((directory / "config.json").read_text())
    arch = config.get("model_type", "unknown")
    params, dominant, vision_params = _safetensors_params(directory)
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": params}
    for key, suffix in _INFO_KEYS.items():
        if key in config:
            info[f"{arch}.{suffix}"] = config[key]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None)
    if theta:
        info[f"{arch}.rope.freq_base"] = theta
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "mxfp4":  # gpt-oss's experts
        level = "MXFP4"
    elif quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type"):
        level = str(quant.get("bnb_4bit_quant_type", "nf4")).upper()
    elif quant.get("load_in_8bit"):
        level = "INT8"
    else:
        dtype = config.get("torch_dtype") or config.get("dtype")
        level = _DTYPE_LABELS.get(str(dtype), _SAFETENSORS_DTYPE_LABELS.get(dominant or "", "F32"))
    architectures = config.get("architectures") or []
    is_embedding = arch in ("bert", "nomic_bert", "xlm-roberta", "mpnet") or not any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures
    )
    vision_config = config.get("vision_config")
    vision = is_vision_checkpoint(directory)
    if vision:
        for key, suffix in (("num_hidden_layers", "block_count"), ("hidden_size", "embedding_length"),
                            ("image_size", "image_size"), ("patch_size", "patch_size")):
            if key in vision_config:
                info[f"{arch}.vision.{suffix}"] = vision_config[key]
    config = {**config, **(config.get("text_config") or {})}  # a multimodal checkpoint's language model
    shape = None
    if config.get("hidden_size") and config.get("num_attention_heads"):
        heads = int(config["num_attention_heads"])
        shape = ModelShape(
            hidden=int(config["hidden_size"]), layers=int(config.get("num_hidden_layers", 0)), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate=int(config.get("intermediate_size", 0)), vocab=int(config.get("vocab_size", 0)),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)), vision_params=vision_params,
            **_expert_shape(config))
    return ModelMetadata(
        format="safetensors",
        architecture=arch,
        parameter_count=params,
        quantization_level=level,
        context_length=int(config.get("max_position_embeddings", 0)),
        embedding_length=int(config.get("hidden_size", 0)),
        chat_template=_hf_chat_template(directory),
        is_embedding_model=is_embedding,
        info=info,
        shape=shape,
        vision=vision,
    )
