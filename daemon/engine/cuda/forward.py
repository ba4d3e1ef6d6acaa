"""The fast GPU forward pass: Triton kernels, fused weights, a CUDA graph per decode batch size,
for every family of the model-definition layer (engine/spec.py).

Per layer and decode step: add+RMSNorm, the QKV product, q/k norms + RoPE + KV write,
split-KV attention and its merge, the O product, add+RMSNorm, the gate/up product,
act(gate)*up, the down product: ten launches, eight where the quantized GEMV runs without
split-K (RoPE and the activation in its epilogues; RoPE only where a layer has no q/k norms
and rotates whole heads), replayed from a captured graph, so Python does one replay per
token. Sandwich norms (Gemma 2/3) ride in the add+RMSNorm launches, sliding windows and
soft-caps in the attention kernel: a family costs no launch more than Llama.
Products use cuBLAS for dense bf16/fp16 weights; bitsandbytes 4-bit weights (NF4 or FP4;
bitsandbytes' layout, the codes relabeled) and int8 go through the quantized GEMVs at 1-4 rows
(1-2 for int8), the batched product on the tensor cores from there to 64 rows (batched decode,
short prompt passes; batched.py), both reading the packed weights as they are. Longer prompt
passes dequantize each matrix into a scratch buffer and run one GEMM, or multiply by a bf16 copy
of each 4-bit matrix where the load plan keeps one (`batch_weights`, off by default). Prompt
attention is PyTorch's (engine/attention.py).

The decoder layer is written once, in `_layers`, for decode steps and prompts alike; the
two differ only in where q attends (the `attend` they pass). The interface is
ReferenceForward's (`forward(tokens, slots, starts)`), so the runner does not know which
path runs. `graphs=False` runs the same kernels without capture (the eager fallback, also
used where capture fails).
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from daemon.engine.attention import PromptSegments
from daemon.engine.cuda import batched as B
from daemon.engine.cuda import gemv as G
from daemon.engine.cuda import kernels as K
from daemon.engine.cuda.moe import ExpertSum, RoutedExperts
from daemon.engine.spec import LayerParts, ModelSpec, UnsupportedArchitecture, decoder, embed_scale_tensor
from daemon.engine.spec import rotary_tables, sectioned_rotary, softcap, take_layers
from daemon.engine.vision import Vision

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# Prompt attention runs on SDPA's flash or memory-efficient kernels, never cuDNN's: cuDNN builds
# an execution plan for each new shape (hundreds of ms), so a prompt of a length not seen before
# would pay for it in the request path.
PROMPT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A prompt pass's rows (and the rows it takes logits of) are padded to a multiple of this: cuBLAS
# spends 2-20 ms the first time it meets a row count (its choice of kernel for the shape; H200,
# bench/prompt_shapes.py: 9 ms a pass in the median over Llama-3-8B's five products), which a
# prompt of a never-seen length paid in its TTFT. With buckets, every row count a pass can have
# is met at load (capture_all). The padding rows write their keys into the scratch slot.
PROMPT_ROWS = 64
# Devices the fast path takes. Tests add "cpu" to run it in Triton's interpreter (graphs=False).
RUNS_ON = frozenset({"cuda"})


def _is_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit layer: NF4, or FP4 (the same layout with another code)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state is not None and getattr(state, "quant_type", None) in ("nf4", "fp4")


def _is_int8(module: torch.nn.Module) -> bool:
    """A bitsandbytes Linear8bitLt with int8 inference weights."""
    weight = getattr(module, "weight", None)
    return getattr(weight, "dtype", None) == torch.int8 and hasattr(weight, "SCB")


def _dense(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear and module.weight.is_floating_point()


def _dense_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A small layer's weight in `dtype`, dequantized where bitsandbytes quantized it (Qwen2-MoE's
    one-row shared-expert gate: one F.linear, no bitsandbytes call in a captured graph)."""
    weight = module.weight
    if _is_4bit(module):
        import bitsandbytes.functional as BF

        return BF.dequantize_4bit(weight.data, weight.quant_state).to(dtype).view(weight.quant_state.shape)
    if _is_int8(module):
        return (weight.float() * (weight.SCB.float()[:, None] / 127)).to(dtype)
    return weight.detach().to(dtype)


def _kind(module: torch.nn.Module) -> str | None:
    return "4bit" if _is_4bit(module) else "int8" if _is_int8(module) else "dense" if _dense(module) else None


# what each quantized kind of layer becomes for the kernels
QUANTIZED_WEIGHTS = {"4bit": G.NF4Weights, "int8": G.Int8Weights}
# Rows up to which each quantized kind multiplies through its GEMV (fastest there, and its
# epilogues fuse RoPE and the activation); from there to batched.MAX_ROWS through the batched
# product; beyond, a bf16 copy where one is kept, else the matrix dequantized into the scratch
# buffer and one GEMM. H200, Llama-3-8B's four products, 32 layers (bench/README.md): NF4+DQ
# GEMV 2.10 / 2.40 / 3.38 ms a step at 1 / 2 / 4 rows against the batched product's 3.31 / 3.32
# / 3.32 (even at 4, where the GEMV's fusions tip it); int8 GEMV 2.16 / 2.95 / 5.65 against
# 2.86 / 2.88 / 2.88.
GEMV_ROWS = {"4bit": 4, "int8": 2}


class Linear:
    """A fused matrix product: dense (cuBLAS), or quantized (bitsandbytes' 4-bit or int8 weights
    through a Triton GEMV or the batched product by row count, see GEMV_ROWS), with an optional
    bf16 copy of 4-bit weights for prompt passes (`batch_weights`)."""

    def __init__(self, modules: list[torch.nn.Module], dtype: torch.dtype, batch_weights: bool = False) -> None:
        self.quantized: G.NF4Weights | G.Int8Weights | None = None
        self.batch_weight: torch.Tensor | None = None
        kinds = {_kind(m) for m in modules}
        kind = kinds.pop() if len(kinds) == 1 else None
        self.gemv_rows = GEMV_ROWS.get(kind, 0)
        self._batched: dict[int, tuple] = {}  # the batched product's setting by tile rows (batched.block_m)
        if kind in QUANTIZED_WEIGHTS:
            self.quantized = QUANTIZED_WEIGHTS[kind](modules)
            self.n, self.k = self.quantized.n, self.quantized.k
            self.weight = self.bias = None
            if batch_weights and kind == "4bit":  # bitsandbytes' own dequantization, kept
                self.batch_weight = self.quantized.dequantize(torch.empty(self.n * self.k, dtype=dtype,
                                                                          device=self.quantized.packed.device))
        elif kind == "dense":
            self.weight = (modules[0].weight.detach().to(dtype) if len(modules) == 1 else
                           torch.cat([m.weight.detach().to(dtype) for m in modules])).contiguous()
            biases = [m.bias for m in modules]
            self.bias = torch.cat([b.detach().to(dtype) for b in biases]) if all(b is not None for b in biases) else None
            self.n, self.k = self.weight.shape
        else:
            raise UnsupportedArchitecture("the fast path handles dense, 4-bit and int8 layers, one kind per product")

    def route(self, rows: int) -> str:
        """Which product this many rows take: "dense" (cuBLAS on the weights), "gemv",
        "batched" (both fp32 results), "copy" (cuBLAS on the bf16 copy) or "scratch"."""
        if self.quantized is None:
            return "dense"
        if rows <= self.gemv_rows:
            return "gemv"
        if rows <= B.MAX_ROWS:
            return "batched"
        return "copy" if self.batch_weight is not None else "scratch"

    def uses_gemv(self, rows: int) -> bool:
        return self.route(rows) == "gemv"

    def adds(self, rows: int) -> bool:
        """Whether this many rows run split-K programs that add into a zeroed fp32 output."""
        route = self.route(rows)
        if route == "gemv":
            return self.quantized.gemv_setting(rows)[1] > 1
        return route == "batched" and self.batched_setting(rows)[3] > 1

    def batched_setting(self, rows: int) -> tuple:
        """batched.setting, looked up once per tile size (prompt passes ask for it per product)."""
        tile = B.block_m(rows)
        if tile not in self._batched:
            self._batched[tile] = B.setting(self.quantized, rows)
        return self._batched[tile]

    def fuses_act(self, rows: int) -> bool:
        """Whether act(gate) * up of this [gate; up] product comes from the GEMV's epilogue
        (the GEMV without split-K: its sums are final when stored)."""
        return self.uses_gemv(rows) and not self.adds(rows)

    def fuses_rope(self, rows: int, head_dim: int) -> bool:
        """Whether RoPE and the KV write of this [q; k; v] product come from the GEMV's epilogue
        (no split-K, and programs that stay within one head)."""
        return self.fuses_act(rows) and head_dim % self.quantized.gemv_setting(rows)[0] == 0

    def __call__(self, x: torch.Tensor, scratch: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T. `out`: a zeroed fp32 buffer [rows, n] where the product adds (`adds`)."""
        route = self.route(x.shape[0])
        if route == "dense":
            return F.linear(x, self.weight, self.bias)
        if route == "gemv":
            return self.quantized.matmul(x, out=out)
        if route == "batched":
            return B.matmul(x, self.quantized, out=out, config=self.batched_setting(x.shape[0]))
        bias = None if self.quantized.bias is None else self.quantized.bias.to(x.dtype)
        if route == "copy":
            return F.linear(x, self.batch_weight.view(self.n, self.k), bias)
        if scratch is not None:  # long prompt passes: dequantize into the scratch buffer, one GEMM
            return F.linear(x, self.quantized.dequantize(scratch[:self.n * self.k]), bias)
        return self.quantized.matmul(x)

    @property
    def nbytes(self) -> int:
        if self.quantized is not None:
            extra = 0 if self.batch_weight is None else self.batch_weight.numel() * self.batch_weight.element_size()
            return self.quantized.nbytes + extra
        return self.weight.numel() * self.weight.element_size()


class _Outputs:
    """One zeroed fp32 buffer for a decode step's split-K products' outputs (GEMV or batched:
    their programs add into them): one memset per step instead of one per product; products
    without split-K store."""

    def __init__(self, rows: int, widths: int, device: torch.device) -> None:
        self.buffer = torch.zeros(rows * widths, dtype=torch.float32, device=device)
        self.used = 0

    def reset(self) -> None:
        self.buffer.zero_()
        self.used = 0

    def take(self, linear: Linear, rows: int) -> torch.Tensor | None:
        if not linear.adds(rows):
            return None
        size = rows * linear.n
        view = self.buffer[self.used:self.used + size].view(rows, linear.n)
        self.used += size
        return view


class _Layer:
    """One decoder layer as the kernels read it: fused products and the norm weights by role;
    a MoE layer's router and experts (moe.py), and its shared expert as gate_up / down."""

    def __init__(self, parts: LayerParts, spec: ModelSpec, dtype: torch.dtype, batch_weights: bool) -> None:
        def norm(weight: torch.Tensor | None) -> torch.Tensor | None:
            return None if weight is None else weight.to(dtype).contiguous()

        self.attn_in_norm, self.mlp_in_norm = norm(parts.attn_in_norm), norm(parts.mlp_in_norm)
        self.attn_out_norm, self.mlp_out_norm = norm(parts.attn_out_norm), norm(parts.mlp_out_norm)
        self.q_norm, self.k_norm = norm(parts.q_norm), norm(parts.k_norm)
        self.sinks = None if parts.sinks is None else parts.sinks.float().contiguous()
        products = parts.products
        self.qkv = Linear(products["qkv"], dtype, batch_weights)
        self.o = Linear(products["o"], dtype, batch_weights)
        self.gate_up = Linear(products["gate_up"], dtype, batch_weights) if "gate_up" in products else None
        self.down = Linear(products["down"], dtype, batch_weights) if "down" in products else None
        self.experts: RoutedExperts | None = None
        self.shared_gate = None if parts.shared_gate is None else _dense_weight(parts.shared_gate, dtype)
        if parts.experts is not None:  # 4-bit where the layer's products are (bitsandbytes left them dense)
            states = [m.weight.quant_state for group in products.values() for m in group if _is_4bit(m)]
            quantization = (states[0].quant_type, states[0].state2 is not None) if states else None
            self.experts = RoutedExperts(parts.router, parts.router_bias, parts.experts, spec, dtype, quantization)
        parts.release()  # the fused copies replace the originals

    @property
    def products(self) -> tuple[Linear, ...]:
        return tuple(p for p in (self.qkv, self.o, self.gate_up, self.down) if p is not None)


class _Graph:
    """Static buffers and the captured decode step for one batch size."""

    def __init__(self, owner: "FastForward", batch: int) -> None:
        dev = owner.device
        self.batch = batch
        # tokens, slots, positions, lengths, and the rotary tables' rows (multimodal rotary only)
        self.meta = torch.zeros((5, batch), dtype=torch.int32, device=dev)
        # two pinned staging buffers, used in turn: with pipelined steps, the copy from one
        # may still be queued while the host fills the next step's
        self.hosts = [torch.zeros((5, batch), dtype=torch.int32) for _ in range(2)]
        if dev.type == "cuda":
            self.hosts = [host.pin_memory() for host in self.hosts]
        self.turn = 0
        self.attention = K.DecodeAttention(batch, owner.num_heads, owner.num_kv_heads, owner.head_dim,
                                           owner.max_ctx, dev, owner.dtype)
        widths = sum(lin.n for layer in owner.layers for lin in layer.products if lin.adds(batch))
        self.outputs = _Outputs(batch, widths, dev) if widths else None
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(self, owner: "FastForward") -> torch.Tensor:
        tokens, slots, positions, lengths = self.meta[0], self.meta[1], self.meta[2], self.meta[3]
        rows = self.meta[4] if owner.spec.rotary_sections else None
        self.logits = owner._decode_body(tokens, slots, positions, lengths, self.attention, self.outputs, rows)
        return self.logits


# Where a layer's queries attend: (layer index, q [rows, H, D]) -> [rows, H * D].
Attend = Callable[[int, torch.Tensor], torch.Tensor]
# How a pass's rows rotate (multimodal rotary): cos / sin tables per layer type, and each row's
# row in them (int32 [T], on the device)
Rotation = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


class FastForward:
    path = "fast"

    def __init__(self, model: torch.nn.Module, num_slots: int, max_ctx: int, graphs: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, batch_weights: bool = False,
                 prompt_rows: int | None = None) -> None:
        spec = ModelSpec.of(model)
        inner = decoder(model)
        device, dtype = inner.embed_tokens.weight.device, inner.embed_tokens.weight.dtype
        if device.type not in RUNS_ON or dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise UnsupportedArchitecture("the fast path needs a CUDA device and float activations")
        parts = take_layers(model, spec)
        for layer in parts:  # check everything before taking anything over
            kinds = {_kind(m) for group in layer.products.values() for m in group}
            if len(kinds) != 1 or None in kinds:
                raise UnsupportedArchitecture("the fast path handles dense, 4-bit and int8 layers, one kind per model")
            weights = QUANTIZED_WEIGHTS.get(kinds.pop())
            for group in layer.products.values():
                reason = weights and weights.unsupported(group)
                if reason:
                    raise UnsupportedArchitecture(reason)
        self.spec = spec
        self.config = model.config
        self.device, self.dtype = device, dtype
        self.num_heads, self.num_kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.hidden = spec.hidden
        self.eps = spec.eps
        self.gemma = spec.norm == "gemma"
        self.fp32_scale = spec.norm == "rms_fp32"
        if self.fp32_scale and spec.qk_norm:
            raise UnsupportedArchitecture("q/k norms scaled in fp32")
        self.num_slots = num_slots
        self.max_ctx = max_ctx
        self.vocab_size = spec.vocab
        self.use_graphs = graphs
        # PROMPT_ROWS on a GPU; 1 (no padding) in Triton's interpreter, where rows cost time
        self.prompt_rows = prompt_rows or (PROMPT_ROWS if device.type == "cuda" else 1)
        self.tables = rotary_tables(model, spec, max_ctx, dtype, device)
        rotary_dim = next(iter(self.tables.values()))[0].shape[-1]
        # the QKV GEMV's RoPE epilogue rotates whole heads of a power-of-two size, without q/k norms
        # (multimodal rotary models rotate by rows of their own: rope_kv's `rows`)
        self.rope_in_gemv = (not spec.qk_norm and rotary_dim == spec.head_dim and not spec.rotary_sections
                             and triton.next_power_of_2(spec.head_dim) == spec.head_dim)

        self.layers = [_Layer(layer, spec, dtype, batch_weights) for layer in parts]
        self.lm_head = Linear([model.lm_head], dtype)
        self.embed = inner.embed_tokens.weight.detach()
        self.embed_scale = embed_scale_tensor(spec, dtype, device)
        self.vision: Vision | None = None  # a vision model's images (set by its runtime)
        self.final_norm = inner.norm.weight.detach().to(dtype)
        dequantized = [lin for layer in self.layers for lin in layer.products
                       if lin.quantized and lin.batch_weight is None]
        largest = max((lin.n * lin.k for lin in dequantized), default=0)
        self.scratch = torch.empty(largest, dtype=dtype, device=device) if largest else None
        # one extra slot: padded rows of a graph bucket write there, never into a sequence's cache
        shape = (num_slots + 1, self.num_kv_heads, max_ctx, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.buckets = tuple(b for b in buckets if b <= max(num_slots, 1)) or (1,)
        if max(self.buckets) < num_slots:
            self.buckets += (num_slots,)
        self._graphs: dict[int, _Graph] = {}

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.k_cache[0].element_size()

    @property
    def weights_bytes(self) -> int:
        dense = sum(lin.nbytes for layer in self.layers for lin in layer.products)
        dense += sum(layer.experts.nbytes for layer in self.layers if layer.experts is not None)
        return dense + self.lm_head.nbytes + self.embed.numel() * self.embed.element_size()

    # ---- the decoder, any number of rows --------------------------------------------------

    def _padded(self, rows: int) -> int:
        return -(-rows // self.prompt_rows) * self.prompt_rows

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens.long(), self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def _norm(self, x: "torch.Tensor | ExpertSum", weight: torch.Tensor, residual: torch.Tensor | None = None,
              pre_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, combine = (x.pairs, x.weights) if isinstance(x, ExpertSum) else (x, None)
        return K.add_rmsnorm(pairs, weight, self.eps, residual=residual, gemma=self.gemma, pre_weight=pre_weight,
                             dtype=self.dtype, fp32_scale=self.fp32_scale, combine=combine)

    def _mlp(self, layer: _Layer, h: torch.Tensor, outputs: "_Outputs | None" = None) -> "torch.Tensor | ExpertSum":
        if layer.experts is None:
            return self._dense_mlp(layer, h, outputs)
        out = layer.experts(h)
        if layer.gate_up is not None:  # the shared expert, scaled by sigmoid(its gate)
            shared = self._dense_mlp(layer, h, outputs).float()
            return out.total() + torch.sigmoid(F.linear(h, layer.shared_gate).float()) * shared
        return out  # summed by the next layer's norm as it reads it

    def _dense_mlp(self, layer: _Layer, h: torch.Tensor, outputs: "_Outputs | None" = None) -> torch.Tensor:
        rows, act = h.shape[0], self.spec.activation
        if act in K.KERNEL_ACTIVATIONS and layer.gate_up.fuses_act(rows):  # one launch fewer per layer
            gated = layer.gate_up.quantized.matmul(h, act=act)
        else:
            gated = K.gated(layer.gate_up(h, self.scratch, outputs and outputs.take(layer.gate_up, rows)), self.spec,
                            self.dtype)
        return layer.down(gated, self.scratch, outputs and outputs.take(layer.down, rows))

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend: Attend,
                outputs: "_Outputs | None" = None, rotary: "Rotation | None" = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every layer over rows x [T, hidden] at positions / slots (int32 [T], on the device),
        rotated by `rotary` where given (multimodal rotary), else by the tables at the positions.
        Returns the last sublayer's output, the residual stream, and the norm still to apply to
        that output before it joins the stream (a sandwich norm), for the final norm."""
        rows, spec = x.shape[0], self.spec
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        out, pending = None, None
        tables, rows_at = (self.tables, None) if rotary is None else rotary
        for i, layer in enumerate(self.layers):
            h, x = self._norm(out if out is not None else x, layer.attn_in_norm,
                              residual=x if out is not None else None, pre_weight=pending)
            cos, sin = tables[spec.layer_types[i]]
            if self.rope_in_gemv and layer.qkv.fuses_rope(rows, dim):  # one launch fewer per layer
                q = layer.qkv.quantized.matmul(h, rope=G.Rotary(cos, sin, positions, slots, self.k_cache[i],
                                                                self.v_cache[i], heads, kv_heads, dim))
            else:
                qkv = layer.qkv(h, self.scratch, outputs and outputs.take(layer.qkv, rows))
                q = K.rope_kv(qkv, cos, sin, positions, slots, self.k_cache[i], self.v_cache[i], heads, kv_heads, dim,
                              q_norm=layer.q_norm, k_norm=layer.k_norm, eps=self.eps, gemma=self.gemma, rows=rows_at)
            o = layer.o(attend(i, q), self.scratch, outputs and outputs.take(layer.o, rows))  # fp32 from a GEMV
            h, x = self._norm(o, layer.mlp_in_norm, residual=x, pre_weight=layer.attn_out_norm)
            out, pending = self._mlp(layer, h, outputs), layer.mlp_out_norm
        if isinstance(out, ExpertSum):  # the callers index the last output's rows
            out = out.total()
        return out, x, pending

    def _logits(self, out: torch.Tensor, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        h, _ = self._norm(out, self.final_norm, residual=x, pre_weight=pending)
        return softcap(self.lm_head(h).float(), self.spec.final_softcap)

    def _decode_attend(self, attention: K.DecodeAttention, slots: torch.Tensor, lengths: torch.Tensor) -> Attend:
        spec = self.spec

        def attend(i: int, q: torch.Tensor) -> torch.Tensor:
            o = attention(q, self.k_cache[i], self.v_cache[i], slots, lengths, spec.attn_scale, spec.windows[i],
                          spec.attn_softcap, self.layers[i].sinks)
            return o.reshape(q.shape[0], self.num_heads * self.head_dim)

        return attend

    def _decode_body(self, tokens, slots, positions, lengths, attention: K.DecodeAttention,
                     outputs: "_Outputs | None" = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        if outputs is not None:
            outputs.reset()
        out, x, pending = self._layers(self._embed(tokens), positions, slots,
                                       self._decode_attend(attention, slots, lengths), outputs,
                                       None if rows is None else (self.tables, rows))
        return self._logits(out, x, pending)

    @torch.inference_mode()
    def forward_mixed(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                      chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """A decode step (tokens [B, 1] at `starts` of `slots`; B may be 0) and prompt chunks
        (token ids, slot, start) in one pass: the matrix products run over all their tokens
        together; attention is the decode kernel for the B rows and PyTorch's for the chunks
        (attention.PromptSegments).
        Returns the B rows' logits, then each chunk's last, [B + len(chunks), vocab] float32."""
        batch = tokens.shape[0]
        ids = tokens[:, 0].tolist() + [t for chunk, _, _ in chunks for t in chunk]
        vision = self.vision if self.vision is not None and max(ids) >= self.vision.first_virtual else None
        if chunks and len(ids) <= self.buckets[-1] and vision is None:
            # a few prompt tokens (the new end of a prompt whose start was cached, a resend): as
            # rows of one captured decode step, each at its own position of its slot. Within a
            # layer every row's keys are written before any row attends, so row i sees rows < i;
            # one replay instead of the prompt path's eager launches, which cost more than the
            # work for a handful of tokens
            row_slots = list(slots) + [slot for chunk, slot, _ in chunks for _ in chunk]
            row_starts = list(starts) + [start + i for chunk, _, start in chunks for i in range(len(chunk))]
            rotary = None
            if self.spec.rotary_sections and self.vision is not None:  # text rows: one position each
                placed = self.vision.pass_positions(self._pass_rows(tokens, slots, starts, chunks))
                rotary = None if placed is None else placed[0].tolist()
            logits = self.forward(torch.tensor(ids, dtype=torch.long)[:, None], row_slots, row_starts, rotary)
            ends = list(itertools.accumulate((len(chunk) for chunk, _, _ in chunks), initial=batch))[1:]
            return logits[list(range(batch)) + [end - 1 for end in ends]]
        segments = [(slot, start, len(chunk)) for chunk, slot, start in chunks]
        horizons = None
        if vision is not None:  # image tokens that see each other (Gemma 3)
            found = {i: vision.horizons(chunk, start) for i, (chunk, _, start) in enumerate(chunks)}
            horizons = {i: h for i, h in found.items() if h is not None} or None
        placed = None
        if self.spec.rotary_sections and self.vision is not None:
            placed = self.vision.pass_positions(self._pass_rows(tokens, slots, starts, chunks))
        tokens_in = torch.tensor(ids) if vision is not None else torch.tensor(ids, device=self.device)
        out, x, pending = self._prompt_layers(tokens_in, segments, list(zip(slots, starts)), horizons, placed)
        ends = itertools.accumulate((len(chunk) for chunk, _, _ in chunks), initial=batch)
        rows = list(range(batch)) + [end - 1 for end in list(ends)[1:]]
        index = torch.tensor(rows + rows[-1:] * (self._padded(len(rows)) - len(rows)), device=self.device)
        return self._logits(out[index], x[index], pending)[:len(rows)]

    @staticmethod
    def _pass_rows(tokens: torch.Tensor, slots: list[int], starts: list[int],
                   chunks: list[tuple[list[int], int, int]]) -> list[tuple[list[int], int, int]]:
        """A pass's rows as Vision.pass_positions takes them: each decode row, then each chunk."""
        return [([t], slot, start) for t, slot, start in zip(tokens[:, 0].tolist(), slots, starts)] + list(chunks)

    def copy_prefix(self, source: int, targets: list[int], length: int) -> None:
        """Slots `targets` take the keys and values of slot `source`'s first `length` positions
        (queued on the stream: after every step launched before, before every step after)."""
        K.copy_prefix([*self.k_cache, *self.v_cache], source, targets, length)
        if self.vision is not None:
            self.vision.copy_rotary(source, targets, length)

    def release(self) -> None:
        """Drop the KV caches and graphs (the model is unloading)."""
        self.k_cache.clear()
        self.v_cache.clear()
        self._graphs.clear()

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] of one sequence (embeddings), in the scratch slot."""
        n = tokens.shape[0]
        out, x, pending = self._prompt_layers(tokens.to(self.device), [(self.num_slots, 0, n)])
        h, _ = self._norm(out[:n], self.final_norm, residual=x[:n], pre_weight=pending)
        return h.float()

    def _prompt_layers(self, tokens: torch.Tensor, segments: list[tuple[int, int, int]],
                       decoding: list[tuple[int, int]] = (), horizons: dict[int, list[int]] | None = None,
                       placed: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """tokens [T]: the `decoding` rows first ((slot, position) each), then the segments
        (slot, start, length): `_layers` with the decode kernel for the former and PyTorch's
        attention for the latter, segments that start at the same position together. The rows
        are padded to a multiple of `prompt_rows` (the padding's keys go to the scratch slot's last
        position, its attention is zero): the results have that many rows, the first T are these.
        No padding where a row of the pass itself sits there (an encode() of max_ctx tokens).
        `placed`: the rows' multimodal rotary positions [3, T] (Vision.pass_positions), if any."""
        batch, rows = len(decoding), tokens.shape[0]
        sink = self.max_ctx - 1  # where the padding's keys go, in the scratch slot
        taken = any(slot == self.num_slots and start + n > sink for slot, start, n in segments) or any(
            slot == self.num_slots and position == sink for slot, position in decoding)
        pad = 0 if taken else self._padded(rows) - rows
        positions = torch.cat([torch.tensor([p for _, p in decoding], dtype=torch.int32)]
                              + [torch.arange(start, start + n, dtype=torch.int32) for _, start, n in segments]
                              + [torch.full((pad,), sink, dtype=torch.int32)])
        slots = torch.cat([torch.tensor([s for s, _ in decoding], dtype=torch.int32)]
                          + [torch.full((n,), slot, dtype=torch.int32) for slot, _, n in segments]
                          + [torch.full((pad,), self.num_slots, dtype=torch.int32)])
        tokens = F.pad(tokens, (0, pad))
        positions, slots = positions.to(self.device, non_blocking=True), slots.to(self.device, non_blocking=True)
        decode_attend = None
        if batch:
            # separate tensors: each starts 16-byte aligned, as in the captured graphs, so the
            # attention kernels need no other compiled variant
            decode_slots = torch.tensor([s for s, _ in decoding], dtype=torch.int32).to(self.device, non_blocking=True)
            lengths = torch.tensor([p + 1 for _, p in decoding], dtype=torch.int32).to(self.device, non_blocking=True)
            decode_attend = self._decode_attend(self._graph_for(batch).attention, decode_slots, lengths)
        spec = self.spec
        prompts = PromptSegments(segments, self.device, horizons)

        def attend(i: int, q: torch.Tensor) -> torch.Tensor:
            o = prompts.attend(q[batch:rows], self.k_cache[i], self.v_cache[i], scale=spec.attn_scale,
                               window=spec.windows[i], softcap=spec.attn_softcap, sinks=self.layers[i].sinks)
            parts = ([decode_attend(i, q[:batch])] if decode_attend is not None else []) + [o]
            return torch.cat(parts + [o.new_zeros(pad, o.shape[1])]) if pad or len(parts) > 1 else o

        x = self._embed(tokens) if self.vision is None else self.vision.embed(tokens, self._embed)
        rotary = None
        if placed is not None:  # the pass's own rotary rows, composed per section; the padding's plain
            at = torch.from_numpy(np.concatenate([placed, np.full((3, pad), sink)], axis=1))
            rotary = (sectioned_rotary(self.tables, at, spec.rotary_sections),
                      torch.arange(rows + pad, dtype=torch.int32, device=self.device))
        with sdpa_kernel(PROMPT_ATTENTION_BACKENDS):
            return self._layers(x, positions, slots, attend, rotary=rotary)

    # ---- decode through a captured graph --------------------------------------------------

    def _bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the {self.num_slots} slots")

    def _graph_for(self, batch: int) -> _Graph:
        bucket = self._bucket(batch)
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = _Graph(self, bucket)
            g.meta[1].fill_(self.num_slots)  # padding rows: the scratch slot
            g.meta[3].fill_(1)
            if self.use_graphs:
                self._capture(g)
        return g

    def _capture(self, g: _Graph) -> None:
        try:
            for _ in range(2):  # compile the Triton kernels outside the capture
                g.run(self)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # PyTorch's shared capture stream: a new stream per capture would leave a cuBLAS
            # workspace behind for each one
            with torch.cuda.graph(graph):
                g.run(self)
            g.graph = graph
        except Exception as exc:  # capture is an optimization: run the same kernels eagerly
            log.warning("CUDA graph capture failed for batch %d (%s); decoding eagerly", g.batch, exc)
            g.graph = None
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def capture_all(self, prefill_tokens: int = 512) -> None:
        """Capture every bucket now (at load), and run the prompt path's kernels by prefilling
        the scratch slot, so that no request pays for a compile (a Triton compile takes up to a
        second) or for cuBLAS's first meeting with a row count: a prefix copy, a prompt pass (its rows are a
        multiple of `prompt_rows`: one of Triton's integer specializations), a whole pass of
        `prefill_tokens`, a chunk that starts past position 0, one beside a decode row, and
        each product at every row count a pass can have."""
        for b in self.buckets:
            self._graph_for(b)
        self.encode(torch.zeros(1, dtype=torch.long))
        self.copy_prefix(self.num_slots, [self.num_slots], 1)  # the prefix-copy kernel: onto itself
        if self.device.type != "cuda":
            return  # Triton's interpreter (the tests) compiles nothing: the long passes only cost time
        full = max(2, min(prefill_tokens, self.max_ctx))
        self.encode(torch.zeros(full, dtype=torch.long))
        half = full // 2
        self._prompt_layers(torch.zeros(full, dtype=torch.long, device=self.device),
                            [(self.num_slots, 0, half), (self.num_slots, half, full - half)])
        # a decode row beside a chunk (a prompt admitted while others decode)
        self._prompt_layers(torch.zeros(half + 1, dtype=torch.long, device=self.device),
                            [(self.num_slots, 1, half)], [(self.num_slots, 0)])
        # every row count a pass's products can meet: a prompt chunk beside every decode row
        largest = self._padded(prefill_tokens + self.num_slots)
        products = {(lin.n, lin.k, lin.quantized is None, lin.batch_weight is None): lin
                    for layer in self.layers for lin in (*layer.products, self.lm_head)}
        inputs = {k: torch.zeros(largest, k, dtype=self.dtype, device=self.device) for _, k, _, _ in products}
        for rows in range(self.prompt_rows, largest + 1, self.prompt_rows):
            for lin in products.values():
                lin(inputs[lin.k][:rows], self.scratch)
        # a MoE layer's long passes: the grouped product at each tile height a pass can take
        for layer in self.layers:
            if layer.experts is not None:
                layer.experts.compile_long_passes()
                break
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                rotary: list[int] | None = None) -> torch.Tensor:
        """Decode rows tokens [B, 1] at `starts` of `slots` through the captured step (a longer
        row goes to forward_mixed). `rotary`: each row's rotary position (multimodal rotary;
        the rows' own from Vision where not given)."""
        batch, steps = tokens.shape
        if steps > 1:
            assert batch == 1
            return self.forward_mixed(tokens[:0], [], [], [(tokens[0].tolist(), slots[0], starts[0])])
        g = self._graph_for(batch)
        host = g.hosts[g.turn]
        g.turn ^= 1
        on_device = tokens.device.type == "cuda"  # the previous step's samples (pipelined decoding)
        if not on_device:
            host[0, :batch] = tokens[:, 0]
        host[1, :batch] = torch.tensor(slots, dtype=torch.int32)
        host[2, :batch] = torch.tensor(starts, dtype=torch.int32)
        host[3, :batch] = host[2, :batch] + 1
        if self.spec.rotary_sections:
            if rotary is None and self.vision is not None:
                # generated tokens are text (their values may still be on the device: not read)
                placed = self.vision.pass_positions([([0], slot, start) for slot, start in zip(slots, starts)])
                rotary = None if placed is None else placed[0].tolist()
            host[4, :batch] = host[2, :batch] if rotary is None else torch.tensor(rotary, dtype=torch.int32)
            host[4, batch:] = 0
        host[1, batch:] = self.num_slots
        host[2, batch:] = 0
        host[3, batch:] = 1
        g.meta.copy_(host, non_blocking=True)
        if on_device:
            g.meta[0, :batch].copy_(tokens[:, 0])
        if g.graph is not None:
            g.graph.replay()
            logits = g.logits
        else:
            logits = g.run(self)
        return logits[:batch]
