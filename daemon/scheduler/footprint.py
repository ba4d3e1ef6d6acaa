"""How much memory a model will take, estimated before loading it.

Weights: the per-layer matrix products at the bytes per parameter of their quantization
(bitsandbytes NF4/FP4: 4 bits plus one fp32 absmax per 64 weights, or an 8-bit absmax with
a second-level fp32 scale per 256 blocks under double quantization; int8: a byte plus an
fp32 scale per row); embeddings and the LM head stay in the compute dtype (bitsandbytes
skips them), as does a mixture of experts' router. bitsandbytes leaves stacked experts dense
too; on a GPU the fast path quantizes them to the model's 4-bit type when it takes the model
over (engine/cuda/moe.py), so they count at 4-bit bytes there, and a long prompt's pass
dequantizes one layer's experts into a scratch buffer. On the CPU the engine keeps dense
weights in fp16 and activations in fp32.
KV cache: every slot's full context. Workspace: activations of one prefill chunk, the
logits, allocator slack, and for a vision model the encoded images it keeps (FEATURES_BUDGET).
Batch weights: where the GPU path keeps a bf16 copy of 4-bit
matrices for batched decoding and prefill, that copy too.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.backends.metadata import ModelShape
from daemon.engine.images import FEATURES_BUDGET
from daemon.registry.catalog import ResolvedModel

NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_ROW_SCALE = 4  # bytes of fp32 scale per output row


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def linear_bytes(shape: ModelShape, mode: str, double_quant: bool, dense_bytes: int) -> int:
    params = shape.linear_params
    if mode in ("nf4", "fp4"):
        return int(params * (NF4_DOUBLE_QUANT_BYTES if double_quant else NF4_BYTES))
    if mode == "int8":
        rows = shape.layers * (shape.head_dim * (shape.heads + 2 * shape.kv_heads) + shape.hidden
                               + 2 * shape.intermediate + shape.hidden)
        return params + rows * INT8_ROW_SCALE
    return params * dense_bytes


def quantized_mode(model: ResolvedModel, device_type: str) -> str:
    """How the linear layers sit in memory: nf4 / fp4 / int8 / none."""
    q = model.modelfile.quantization
    if device_type != "cuda":
        return "none"
    if model.quantization_level in ("NF4", "FP4", "INT8") and q.mode == "none":  # a pre-quantized checkpoint
        return model.quantization_level.lower()
    return q.mode


def estimate(model: ResolvedModel, num_ctx: int, slots: int, device_type: str, prefill_chunk: int = 512,
             batch_weights: bool = False) -> Footprint:
    shape = model.metadata.shape
    if shape is None:  # unknown architecture: the files' size is the best guess
        return Footprint(weights=model.size, kv_cache=0, workspace=64 << 20)
    on_gpu = device_type == "cuda"
    act_bytes = 2 if on_gpu else 4
    dense_bytes = 2  # bf16/fp16 on a GPU; fp16 weights on the CPU
    q = model.modelfile.quantization
    mode = quantized_mode(model, device_type)
    double = True if on_gpu and q.mode == "none" else q.double_quant
    weights = linear_bytes(shape, mode, double, dense_bytes)
    if batch_weights and mode in ("nf4", "fp4"):
        weights += shape.linear_params * dense_bytes
    head = shape.embedding_params * dense_bytes
    embed = 0 if shape.tied_embeddings else shape.embedding_params * (act_bytes if not on_gpu else dense_bytes)
    weights += head + embed + shape.layers * 2 * shape.hidden * act_bytes
    routers = shape.sparse_layers * shape.experts * shape.hidden
    experts_quantized = on_gpu and mode in ("nf4", "fp4")
    expert_bytes = (NF4_DOUBLE_QUANT_BYTES if double else NF4_BYTES) if experts_quantized else dense_bytes
    weights += int((shape.expert_params - routers) * expert_bytes) + routers * dense_bytes
    weights += shape.vision_params * dense_bytes
    kv = shape.kv_bytes_per_token(act_bytes) * num_ctx * slots
    chunk = min(prefill_chunk, num_ctx)
    workspace = chunk * (4 * shape.hidden + 2 * shape.intermediate + shape.head_dim * (shape.heads + 2 * shape.kv_heads)) * act_bytes
    workspace += slots * shape.vocab * 4 * 2 + (32 << 20)
    if on_gpu and mode != "none" and not (batch_weights and mode in ("nf4", "fp4")):
        # prompts and batches multiply quantized matrices dequantized into one scratch buffer
        workspace += shape.largest_product_params * dense_bytes
    if model.metadata.vision:
        workspace += FEATURES_BUDGET
    if experts_quantized and shape.sparse_layers:
        workspace += (shape.expert_params - routers) // shape.sparse_layers * dense_bytes
    return Footprint(weights=weights, kv_cache=kv, workspace=workspace)
