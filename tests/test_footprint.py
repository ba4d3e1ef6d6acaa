"""Footprint estimates: exact arithmetic for Llama-3-8B shapes, and against what the CPU
engine really holds for the tiny model."""

from dataclasses import dataclass

import pytest
import torch

from daemon.backends.metadata import ModelShape
from daemon.registry.modelfile import Quantization
from daemon.scheduler.footprint import NF4_DOUBLE_QUANT_BYTES, estimate, linear_bytes

LLAMA3_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                       tied_embeddings=False)


def test_llama3_8b_parameter_split():
    assert LLAMA3_8B.linear_params == 6_979_321_856
    assert LLAMA3_8B.linear_params + 2 * LLAMA3_8B.embedding_params + 65 * 4096 == 8_030_261_248


@pytest.mark.parametrize("mode,double,gib", [("none", False, 13.0), ("nf4", True, 3.35), ("nf4", False, 3.66),
                                              ("int8", False, 6.5)])
def test_linear_bytes(mode, double, gib):
    assert linear_bytes(LLAMA3_8B, mode, double, 2) / (1 << 30) == pytest.approx(gib, abs=0.05)


@dataclass
class FakeMetadata:
    shape: ModelShape
    vision: bool = False


@dataclass
class FakeModelfile:
    quantization: Quantization


@dataclass
class FakeModel:
    metadata: FakeMetadata
    modelfile: FakeModelfile
    quantization_level: str = "BF16"
    size: int = 0
    context_length: int = 8192


MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                     vocab_size=151936, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                     mlp_only_layers=[], tie_word_embeddings=False)


def _shape_of(config: dict, tmp_path) -> ModelShape:
    import json

    from daemon.backends.metadata import read_metadata

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["XForCausalLM"]}))
    metadata = read_metadata(tmp_path)
    arch = config["model_type"]  # Ollama's model_info keys, as llama.cpp names them
    assert (metadata.info[f"{arch}.expert_count"], metadata.info[f"{arch}.expert_used_count"]) == (
        config.get("num_local_experts") or config["num_experts"], config["num_experts_per_tok"])
    return metadata.shape


@pytest.mark.parametrize("config,norms,total", [
    (MIXTRAL_8X7B, 65 * 4096, 46_702_792_704),  # the checkpoint's parameter count
    (QWEN3_30B_A3B, 97 * 2048 + 48 * 2 * 128, 30_532_122_624),
])
def test_a_mixture_of_experts_counts_every_expert(config, norms, total, tmp_path):
    shape = _shape_of(config, tmp_path)
    assert shape.linear_params + shape.expert_params + 2 * shape.embedding_params + norms == total
    # bitsandbytes quantizes the attention; the fast path the experts (on a GPU); the CPU keeps them in fp16
    model = FakeModel(FakeMetadata(shape), FakeModelfile(Quantization("nf4", True, "bfloat16")))
    gpu = estimate(model, num_ctx=4096, slots=1, device_type="cuda")
    assert gpu.weights == pytest.approx(2 * shape.embedding_params * 2
                                        + (shape.linear_params + shape.expert_params) * NF4_DOUBLE_QUANT_BYTES, rel=0.01)
    # a long prompt's pass dequantizes one layer's experts
    assert gpu.workspace > shape.expert_params / shape.sparse_layers * 2
    cpu = estimate(model, num_ctx=4096, slots=1, device_type="cpu").weights
    assert cpu == pytest.approx((shape.linear_params + shape.expert_params + shape.embedding_params) * 2
                                + shape.embedding_params * 4, rel=0.01)


def test_gpu_nf4_total_for_8b():
    model = FakeModel(FakeMetadata(LLAMA3_8B), FakeModelfile(Quantization("nf4", True, "bfloat16")))
    f = estimate(model, num_ctx=8192, slots=4, device_type="cuda")
    assert f.kv_cache == 4 * 8192 * 2 * 32 * 8 * 128 * 2  # 4 GiB
    assert f.weights / (1 << 30) == pytest.approx(3.35 + 2 * 0.98, abs=0.05)
    assert NF4_DOUBLE_QUANT_BYTES < 0.52


def test_cpu_estimate_matches_the_engine(tiny_dirs):
    from daemon.backends.runtime import load_runtime
    from daemon.config import Settings
    from daemon.names import ModelName
    from daemon.server.app import build_catalog

    from conftest import write_tiny_modelfiles

    root = tiny_dirs["random"].parent / "fp"
    write_tiny_modelfiles(root / "mf", tiny_dirs)
    settings = Settings.from_env({}, models_dir=root / "m", user_modelfiles_dir=root / "mf", device="cpu",
                                 num_parallel=2, context_length=512)
    model = build_catalog(settings).resolve(ModelName.parse("tiny:random"))
    runtime = load_runtime(model, settings)
    try:
        predicted = estimate(model, 512, 2, "cpu")
        assert predicted.weights + predicted.kv_cache == pytest.approx(runtime.size_bytes, rel=0.15)
    finally:
        runtime.close()


GATE_UP_BF16 = 2 * 14336 * 4096 * 2  # the largest matrix of a Llama-3-8B layer, dequantized


def test_batch_weights_add_a_bf16_copy_of_4bit_matrices_only():
    """The copy replaces the scratch buffer that prompts dequantize each matrix into."""
    nf4 = FakeModel(FakeMetadata(LLAMA3_8B), FakeModelfile(Quantization("nf4", True, "bfloat16")))
    dense = FakeModel(FakeMetadata(LLAMA3_8B), FakeModelfile(Quantization("none", False, "bfloat16")))
    for model, extra in ((nf4, LLAMA3_8B.linear_params * 2 - GATE_UP_BF16), (dense, 0)):
        plain = estimate(model, num_ctx=2048, slots=32, device_type="cuda")
        copied = estimate(model, num_ctx=2048, slots=32, device_type="cuda", batch_weights=True)
        assert copied.total - plain.total == extra


@pytest.mark.parametrize("mode, scratch", [("nf4", GATE_UP_BF16), ("fp4", GATE_UP_BF16), ("int8", GATE_UP_BF16),
                                           ("none", 0)])
def test_quantized_models_count_the_dequantize_scratch_on_a_gpu(mode, scratch):
    model = FakeModel(FakeMetadata(LLAMA3_8B), FakeModelfile(Quantization(mode, False, "bfloat16")))
    on_gpu = estimate(model, num_ctx=2048, slots=1, device_type="cuda")
    chunk = 512 * (4 * 4096 + 2 * 14336 + 128 * (32 + 16)) * 2
    assert on_gpu.workspace == chunk + 128256 * 4 * 2 + (32 << 20) + scratch


@pytest.mark.parametrize("setting, mode, keep", [
    ("off", "nf4", False),   # the default: batches multiply the 4-bit weights themselves
    ("on", "nf4", True), ("on", "fp4", True),
    ("on", "int8", False),   # int8 has no copy: its batched product runs at int8's bytes
    ("on", "none", False),
])
def test_the_bf16_batch_copy_is_kept_only_when_asked_for(setting, mode, keep, monkeypatch):
    from daemon.backends import runtime
    from daemon.config import Settings

    monkeypatch.setattr(runtime, "pick_device", lambda _: torch.device("cuda"))
    model = FakeModel(FakeMetadata(LLAMA3_8B), FakeModelfile(Quantization(mode, True, "bfloat16")))
    settings = Settings.from_env({"HFOLLAMA_BATCH_WEIGHTS": setting, "OLLAMA_CONTEXT_LENGTH": "2048"})
    assert runtime.plan_load(model, settings, num_parallel=32).batch_weights is keep


def test_a_vision_tower_counts_in_the_compute_dtype():
    """Gemma 3 12B's SigLIP tower and projector (about 0.42 B parameters) stay in bf16 beside the
    NF4 language model; their parameters are read from the safetensors names."""
    import dataclasses

    quantized = FakeModelfile(Quantization("nf4", True, "bfloat16"))
    text = estimate(FakeModel(FakeMetadata(LLAMA3_8B), quantized), num_ctx=2048, slots=4, device_type="cuda")
    with_tower = dataclasses.replace(LLAMA3_8B, vision_params=417_000_000)
    both = estimate(FakeModel(FakeMetadata(with_tower), quantized), num_ctx=2048, slots=4, device_type="cuda")
    assert both.weights - text.weights == 417_000_000 * 2


def test_a_vision_model_counts_the_images_it_keeps():
    from daemon.engine.images import FEATURES_BUDGET

    quantized = FakeModelfile(Quantization("nf4", True, "bfloat16"))
    text = estimate(FakeModel(FakeMetadata(LLAMA3_8B), quantized), num_ctx=2048, slots=4, device_type="cuda")
    vision = estimate(FakeModel(FakeMetadata(LLAMA3_8B, vision=True), quantized), num_ctx=2048, slots=4,
                      device_type="cuda")
    assert vision.workspace - text.workspace == FEATURES_BUDGET


def test_vision_parameters_from_the_checkpoint(tmp_path):
    import visionmodels as vm

    from daemon.backends.metadata import read_metadata

    meta = read_metadata(vm.build(tmp_path / "llava", "llava"))
    assert meta.vision and 0 < meta.shape.vision_params < meta.parameter_count
    assert meta.info["llava.vision.block_count"] == 2
