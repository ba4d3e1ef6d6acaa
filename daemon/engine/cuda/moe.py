"""A mixture-of-experts layer on the fast path (engine/spec.py's Experts).

bitsandbytes quantizes nn.Linear layers only, so transformers leaves a MoE checkpoint's stacked
experts ([experts, 2 * intermediate, hidden] and [experts, hidden, intermediate]) in the compute
dtype. Where the model's other products are 4-bit, the experts are quantized here, each expert's
matrix on its own as bitsandbytes quantizes a Linear4bit (its quant type, double quantization,
blocks of 64), and the experts of a layer stacked into one NF4Weights: a 30B model with 3B active
parameters then costs 4-bit memory and reads only its tokens' experts' 4-bit bytes.

Decode steps run graph-capturable, without a loop over experts or a host sync: the router's
product, softmax and top k on the GPU (kernels.Router: what engine/forward.route computes for the
reference path, in one launch). Small batches then take one GEMV launch for every (token,
expert) pair's [gate; up] with the activation in its epilogue, and one for the down products
(gemv.Routed); batches of 1.5 pairs per expert or more (GROUPED_PAIRS_PER_EXPERT) and prompt passes
sort the pairs by expert in one launch and multiply each expert's tiles of pairs on the tensor
cores straight from the 4-bit experts (batched.grouped_matmul), so that an expert is read once
per tile, not once per pair. The pairs are summed by the routing weights as the next RMSNorm
reads them (ExpertSum; kernels.weighted_sum where nothing follows). Dense experts (a bf16 model)
gather each pair's matrices for one batched product, or (long passes) run one GEMM per expert hit
over its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from daemon.engine.cuda import batched as B
from daemon.engine.cuda import gemv as G
from daemon.engine.cuda import kernels as K
from daemon.engine.spec import ExpertWeights, ModelSpec

# Passes of up to this many rows route in one launch with the router's product (kernels.Router:
# decode steps, short prompt passes); longer ones take cuBLAS's GEMM for the logits.
ROUTED_ROWS = 64
# 4-bit experts: passes whose (token, expert) pairs number fewer than this many times the experts
# take the routed GEMVs (a program column per pair, each reading its expert's rows: the fewest
# launches, and an expert read once per pair that picked it); from there on the grouped product
# (the pairs sorted into per-expert tiles: each expert read once per tile). One layer's experts
# on an H100 (`bench/device.sh moe`, µs, routed / grouped): Qwen3-30B-A3B (128 experts, top 8)
# at 16 tokens 158 / 186, at 32 295 / 242, at 64 567 / 270; gpt-oss-20b (32, top 4) at 8 tokens
# 228 / 230, at 16 433 / 309: the grouped product wins from between 1 and 2 pairs per expert.
GROUPED_PAIRS_PER_EXPERT = 1.5


@dataclass(frozen=True)
class ExpertSum:
    """A MoE layer's output before its sum: the (token, expert) pairs' outputs and their
    routing weights. The next RMSNorm sums them as it reads them (kernels.add_rmsnorm's
    `combine`: one launch a layer fewer); `total` is the sum itself."""

    pairs: torch.Tensor  # [rows * top_k, hidden]
    weights: torch.Tensor  # [rows, top_k]

    def total(self) -> torch.Tensor:
        """[rows, hidden] fp32."""
        return K.weighted_sum(self.pairs, self.weights)


def _quantized(stack: torch.Tensor, quant_type: str, double: bool) -> G.NF4Weights:
    """Every expert's matrix [experts, n, k] quantized as its own bitsandbytes 4-bit weight, then
    fused (NF4Weights keeps each one's double-quantization offset)."""
    import bitsandbytes.functional as BF

    modules = []
    for matrix in stack:
        packed, state = BF.quantize_4bit(matrix.contiguous(), blocksize=64, quant_type=quant_type,
                                         compress_statistics=double)
        modules.append(SimpleNamespace(weight=SimpleNamespace(data=packed, quant_state=state), bias=None))
    return G.NF4Weights(modules)


class RoutedExperts:
    """One MoE layer's router and experts as the kernels read them."""

    def __init__(self, router: torch.Tensor, router_bias: torch.Tensor | None, experts: ExpertWeights,
                 spec: ModelSpec, dtype: torch.dtype, quantization: tuple[str, bool] | None) -> None:
        """`quantization`: (bitsandbytes quant type, double quantization) to quantize the
        experts to, or None to keep them in `dtype`."""
        self.model = spec
        self.spec = spec.experts
        self.router = router.to(dtype).contiguous()
        self.router_bias = None if router_bias is None else router_bias.to(dtype)
        self.routing = K.Router(self.router, self.router_bias, ROUTED_ROWS)
        # gpt-oss's experts' biases, added to the products' fp32 outputs
        self.gate_up_bias = None if experts.gate_up_bias is None else experts.gate_up_bias.float().contiguous()
        self.down_bias = None if experts.down_bias is None else experts.down_bias.float().contiguous()
        self.count, two_i, self.hidden = experts.gate_up.shape
        self.intermediate = two_i // 2
        self.dtype = dtype
        self.gate_up: G.NF4Weights | torch.Tensor
        self.down: G.NF4Weights | torch.Tensor
        if quantization is not None:
            quant_type, double = quantization
            self.gate_up = _quantized(experts.gate_up.to(dtype), quant_type, double)
            self.down = _quantized(experts.down.to(dtype), quant_type, double)
        else:
            self.gate_up = experts.gate_up.to(dtype).contiguous()
            self.down = experts.down.to(dtype).contiguous()

    @property
    def quantized(self) -> bool:
        return isinstance(self.gate_up, G.NF4Weights)

    @property
    def nbytes(self) -> int:
        if self.quantized:
            experts = self.gate_up.nbytes + self.down.nbytes
        else:
            experts = sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))
        small = [t for t in (self.router, self.router_bias, self.gate_up_bias, self.down_bias) if t is not None]
        return experts + sum(t.numel() * t.element_size() for t in small)

    def compile_long_passes(self) -> None:
        """Run the long passes' kernels at every tile height (batched.block_m of the pairs per
        expert: 16, 32, 64 rows, each its own compile), so that no request compiles them (at
        load: FastForward.capture_all)."""
        if not self.quantized:
            return
        for per_expert in (1, 17, 33):
            tokens = self.count * per_expert // self.spec.top_k or 1
            chosen = torch.arange(tokens * self.spec.top_k, device=self.router.device, dtype=torch.int32) % self.count
            self._grouped(torch.zeros(tokens, self.hidden, dtype=self.dtype, device=self.router.device), chosen)

    def __call__(self, h: torch.Tensor) -> ExpertSum:
        """The experts' outputs for rows h [rows, hidden] and the router's weights for their sum."""
        moe = self.spec  # engine/forward.route's routing, its softmax, top k and cast in one launch
        dtype = h.dtype if moe.softmax_after_topk or not moe.route_in_fp32 else torch.float32
        rows, top_k = h.shape[0], moe.top_k
        if rows <= ROUTED_ROWS:  # decode steps: the router's product in the same launch
            weights, chosen = self.routing(h, top_k, moe.softmax_after_topk, moe.normalize, dtype)
        else:  # long passes: cuBLAS's GEMM for the logits
            logits = F.linear(h, self.router, self.router_bias)
            weights, chosen = K.route_topk(logits, top_k, moe.softmax_after_topk, moe.normalize, dtype)
        chosen = chosen.flatten()
        if not self.quantized:
            y = self._gathered(h, chosen) if rows <= ROUTED_ROWS else self._by_expert(h, chosen)
        elif rows * top_k < GROUPED_PAIRS_PER_EXPERT * self.count:
            y = self._routed(h, chosen)
        else:
            y = self._grouped(h, chosen)
        return ExpertSum(y.view(rows * top_k, self.hidden), weights)

    def _gated(self, gate_up: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the pairs' [gate; up] (fp32 or the dtype), biases added: the dtype."""
        if self.gate_up_bias is not None:
            gate_up = gate_up.float() + self.gate_up_bias[chosen]
        return K.gated(gate_up, self.model, self.dtype)

    def _biased_down(self, y: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return y if self.down_bias is None else y.float() + self.down_bias[chosen]

    def _routed(self, h: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """4-bit experts, every (token, expert) pair one GEMV row: [pairs, hidden] fp32."""
        pairs = chosen.to(torch.int32)
        gate_up = G.Routed(pairs, 2 * self.intermediate, per_x=self.spec.top_k)
        # no split-K and no bias: the activation in the epilogue
        if (self.gate_up.gemv_setting(1, gate_up)[1] == 1 and self.gate_up_bias is None
                and self.model.activation in K.KERNEL_ACTIVATIONS):
            gated = self.gate_up.matmul(h, act=self.model.activation, routed=gate_up)
        else:
            gated = self._gated(self.gate_up.matmul(h, routed=gate_up), chosen)
        return self._biased_down(self.down.matmul(gated, routed=G.Routed(pairs, self.hidden)), chosen)

    def _grouped(self, h: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Long passes over 4-bit experts: the pairs sorted by expert, each expert's matrices read
        once per tile of its pairs, on the tensor cores (batched.grouped_matmul): two launches a
        layer where one GEMM per expert hit took a few hundred (Qwen3-30B-A3B's first 8-stream
        burst waited 0.9 s for its first token), and no dequantized copy of the experts."""
        layout = B.GroupedLayout.of(chosen, self.count)  # one sort for both products
        gate_up = B.grouped_matmul(h, self.gate_up, layout, 2 * self.intermediate, per_x=self.spec.top_k)
        gated = self._gated(gate_up, chosen)
        return self._biased_down(B.grouped_matmul(gated, self.down, layout, self.hidden), chosen)

    def _gathered(self, h: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Dense experts: each pair's matrices gathered, one batched product each."""
        x = h.repeat_interleave(self.spec.top_k, dim=0)[:, None]  # [pairs, 1, hidden]
        gated = self._gated(torch.bmm(x, self.gate_up[chosen].transpose(1, 2))[:, 0], chosen)
        return self._biased_down(torch.bmm(gated[:, None], self.down[chosen].transpose(1, 2))[:, 0], chosen)

    def _by_expert(self, h: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Long passes over dense experts: the pairs sorted by expert, one GEMM per expert hit over
        its tokens (one host sync a layer: prompt passes are not captured)."""
        top_k = self.spec.top_k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.count).tolist()
        tokens = order // top_k
        gated = torch.empty(flat.numel(), self.intermediate, dtype=self.dtype, device=h.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                span = slice(start, start + count)
                pick = order[span]
                gated[pick] = self._gated(F.linear(h[tokens[span]], self.gate_up[expert]), flat[pick])
                start += count
        y = torch.empty(flat.numel(), self.hidden, dtype=self.dtype, device=h.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                pick = order[start:start + count]
                y[pick] = self._biased_down(F.linear(gated[pick], self.down[expert]), flat[pick]).to(self.dtype)
                start += count
        return y
