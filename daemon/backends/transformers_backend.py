"""Loading a resolved model into memory with transformers (+ bitsandbytes on CUDA)."""

from __future__ import annotations

import json

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.backends.metadata import is_vision_checkpoint
from daemon.errors import InternalError
from daemon.registry.catalog import ResolvedModel
from daemon.registry.modelfile import Quantization
from daemon.store.derived import DerivedCache

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    eos_token_ids: frozenset[int]
    weights_bytes: int
    processor: Any = None  # a vision model's processor (images to pixel tensors and prompt tokens)


def pick_device(setting: str) -> torch.device:
    if setting in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise InternalError(f"device {setting!r} requested but CUDA is not available")
    return torch.device(setting)


def compute_dtype(quantization: Quantization, device: torch.device) -> torch.dtype:
    """bf16 where the card supports it, else fp16 (a T4); float32 on the CPU, where AVX2
    has no fast half-precision matrix products."""
    if device.type != "cuda":
        return torch.float32
    if quantization.compute_dtype != "auto":
        return getattr(torch, quantization.compute_dtype)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def bnb_config(quantization: Quantization, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization.mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.mode,
                                  bnb_4bit_use_double_quant=quantization.double_quant,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def quantize_linears(model: torch.nn.Module, quantization: Quantization, dtype: torch.dtype) -> int:
    """The decoder layers' nn.Linear products replaced by bitsandbytes' 4-bit or int8 layers, as
    transformers' BitsAndBytesConfig would have made them at load: for a checkpoint that ships in
    another quantization (gpt-oss's MXFP4), loaded dequantized. The head, embeddings, routers
    and stacked experts stay as they are (the fast path quantizes experts itself). Returns how
    many layers it quantized."""
    import bitsandbytes as bnb

    from daemon.engine.spec import decoder

    count = 0
    for layer in decoder(model).layers:
        for holder_name in ("self_attn", "mlp"):
            holder = getattr(layer, holder_name, None)
            for name, child in list(holder.named_modules()) if holder is not None else ():
                if type(child) is not torch.nn.Linear or "router" in name or name.endswith("gate"):
                    continue
                weight, bias = child.weight.data, child.bias
                device = weight.device
                if quantization.mode in ("nf4", "fp4"):
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias is not None,
                                            compute_dtype=dtype, compress_statistics=quantization.double_quant,
                                            quant_type=quantization.mode, device="meta")
                    new.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, blocksize=64,
                                                   compress_statistics=quantization.double_quant,
                                                   quant_type=quantization.mode).to(device)
                else:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias is not None,
                                              has_fp16_weights=False, threshold=6.0, device="meta")
                    new.weight = bnb.nn.Int8Params(weight.to(dtype), requires_grad=False,
                                                   has_fp16_weights=False).to(device)
                if bias is not None:
                    new.bias = torch.nn.Parameter(bias.data.to(dtype), requires_grad=False)
                parent, _, leaf = name.rpartition(".")
                setattr(holder.get_submodule(parent) if parent else holder, leaf, new)
                count += 1
    return count


# The modules of a vision checkpoint that stay in the compute dtype when its language model is
# quantized: the towers and projectors (small, and sensitive to 4-bit rounding), and the head.
VISION_MODULES = ["vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "lm_head"]


def load_processor(folder: Path, name: str) -> Any:
    """The checkpoint's processor, or None (logged) when this transformers cannot build it: the
    model then serves text only."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as exc:
        processor = images_only_processor(folder)
        if processor is None:
            log.warning("%s: no image input (its processor does not load: %s)", name, str(exc).splitlines()[0])
            return None
    if getattr(processor, "image_token", None) is None or getattr(processor, "image_processor", None) is None:
        log.warning("%s: no image input (its processor names no image token)", name)
        return None
    return processor


def images_only_processor(folder: Path) -> Any:
    """The checkpoint's processor without its video processor, or None. Qwen2-VL's family
    declares one, and transformers builds video processors on torchvision only; images need
    neither (its image processor has a PIL backend), and torchvision is not a dependency here:
    a build not matching torch's breaks transformers' imports altogether."""
    import transformers

    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            class_name = json.loads((folder / name).read_text()).get("processor_class")
        except (OSError, ValueError):
            continue
        base = getattr(transformers, str(class_name), None) if class_name else None
        if base is not None and "video_processor" in base.get_attributes():
            break
    else:
        return None

    try:
        return images_only_class(base).from_pretrained(folder)
    except Exception:  # noqa: BLE001 - logged by the caller as the processor's own failure
        return None


def images_only_class(base: type) -> type:
    """The processor class `base` without its video processor."""

    class ImagesOnly(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = base.__name__  # saved (a quantized copy's) as the original
    return ImagesOnly


def converted_gguf_folder(gguf: Path, digest: str, cache: DerivedCache) -> Path:
    """The HF folder converted from a GGUF, converting it the first time."""

    def build(out: Path) -> None:
        log.info("converting %s to an HF checkpoint (first load only)", gguf.name)
        proc = subprocess.run([sys.executable, "-m", "daemon.backends.convert_gguf", str(gguf), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise InternalError(f"could not convert {gguf.name}: " + " | ".join(tail))

    return cache.get_or_build(f"gguf-{digest[:24]}", build, sources=[digest])


def eos_ids(tokenizer: Any, model: torch.nn.Module) -> frozenset[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)


def quantized_key(resolved: ResolvedModel, quantization: Quantization, dtype: torch.dtype) -> str:
    """The derived-cache key of a checkpoint quantized on load: mode, settings, weights."""
    import hashlib

    weights = hashlib.sha256(repr(sorted(resolved.file_digests.items())).encode()).hexdigest()[:24]
    dq = "-dq" if quantization.double_quant else ""
    return f"bnb-{quantization.mode}{dq}-{str(dtype).removeprefix('torch.')}-{weights}"


def _check_architecture(folder: Path) -> None:
    """A model type this transformers does not know is refused by name, before a traceback
    from deep inside from_pretrained can be."""
    import json

    import transformers
    from transformers import AutoConfig

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return  # from_pretrained says what is wrong with the folder
    try:
        AutoConfig.for_model(model_type) if model_type else None
    except (ValueError, KeyError):
        raise InternalError(f"architecture {model_type!r} is not known to transformers {transformers.__version__}, "
                            "so hfollama cannot run this model (a newer transformers may)") from None


def _load_gguf_packed(resolved: ResolvedModel, derived: DerivedCache) -> LoadedModel | None:
    """A GGUF on the CPU, its blocks read as they are (backends/gguf_model.py); None for an
    architecture that module does not read."""
    from daemon.backends import gguf_model

    path = resolved.location.path
    loaded = gguf_model.load(path, resolved.file_digests[path.name], derived)
    if loaded is None:
        return None
    model, tokenizer = loaded
    return LoadedModel(model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                       eos_token_ids=eos_ids(tokenizer, model), weights_bytes=gguf_model.weights_bytes(model))


def load_causal_lm(resolved: ResolvedModel, device: torch.device, derived: DerivedCache) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a daemon's log is no place for progress bars
    location = resolved.location
    folder = location.path
    if location.is_gguf and device.type == "cpu":
        packed = _load_gguf_packed(resolved, derived)
        if packed is not None:
            return packed
    if location.is_gguf:
        folder = converted_gguf_folder(location.path, resolved.file_digests[location.path.name], derived)
    quantization = resolved.modelfile.quantization
    dtype = compute_dtype(quantization, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    vision = not location.is_gguf and is_vision_checkpoint(folder)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
        config = bnb_config(quantization, dtype)
        if config is not None:
            if vision:
                config.llm_int8_skip_modules = VISION_MODULES
            kwargs["quantization_config"] = config
    elif quantization.mode != "none":
        log.warning("%s: %s quantization needs a CUDA GPU; loading unquantized on the CPU",
                    resolved.name.display, quantization.mode)
    # Quantize once: a checkpoint quantized on load is saved in the store, already quantized,
    # and later loads read that (a third of the bytes, no quantizing).
    cache_key = None
    # not a mixture of experts: bitsandbytes leaves its stacked experts (most of its bytes) in
    # bf16, so the saved copy would be nearly the full checkpoint again (58 GB for Qwen3-30B-A3B)
    # for a few seconds' saving; the fast path quantizes the experts at take-over instead
    experts = resolved.metadata.shape is not None and resolved.metadata.shape.experts
    if "quantization_config" in kwargs and not location.is_gguf and not experts:
        cache_key = quantized_key(resolved, quantization, dtype)
        cached = derived.get(cache_key)
        if cached is not None:
            folder = cached
            del kwargs["quantization_config"]  # its config.json carries it
            cache_key = None
    _check_architecture(folder)
    requantize = None
    if resolved.metadata.quantization_level == "MXFP4":
        # gpt-oss ships its experts in MXFP4, whose kernels transformers takes from the Hub: load
        # them dequantized, then quantize the attention as the modelfile asks (the experts follow
        # it on the fast path)
        from transformers import Mxfp4Config

        requantize = kwargs.pop("quantization_config", None)
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # from the checkpoint itself: a quantized copy kept from before may not carry it
    processor = load_processor(location.path, resolved.name.display) if vision else None
    if processor is not None:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.eval()
    if requantize is not None:
        log.info("%s: quantized %d layers to %s after dequantizing MXFP4", resolved.name.display,
                 quantize_linears(model, quantization, dtype), quantization.mode)
    if cache_key is not None:
        try:
            def save(out: Path) -> None:
                model.save_pretrained(out)
                tokenizer.save_pretrained(out)
                if processor is not None:
                    processor.save_pretrained(out)
            derived.get_or_build(cache_key, save, sources=resolved.file_digests.values())
            log.info("%s: kept the quantized weights for the next load", resolved.name.display)
        except Exception as exc:  # a full disk must not fail the load itself
            log.warning("%s: could not keep the quantized weights: %s", resolved.name.display, exc)
    if device.type != "cuda":
        model.to(device)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        eos_token_ids=eos_ids(tokenizer, model),
        weights_bytes=int(model.get_memory_footprint()),
        processor=processor,
    )
