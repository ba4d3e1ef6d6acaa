"""The reference forward pass: every family of the model-definition layer (engine/spec.py),
in PyTorch, over the HF model's own weights. It is the CPU path, the GPU path where the
Triton kernels cannot run, and what the fast path is checked against.

transformers loads the weights (safetensors, GGUF, bitsandbytes NF4/FP4/int8);
`ReferenceForward` takes them over (spec.take_layers), fuses q/k/v and gate/up into single
matrix products, and runs them with a KV cache of `num_slots` independent sequences, so one
decode step carries several requests at different positions (gpt-fast's prefill / decode
split). The decoder layer is written once, in `_layers`, and reads the spec's fields.

Dtypes: activations (residual stream, norms, attention, KV cache) run in the model's compute
dtype; dense linear weights may be stored narrower. On the CPU they are kept in fp16 while
activations stay fp32: decoding reads every weight once per token, AVX2 CPUs multiply fp16
weights at full memory bandwidth, and their fp16 elementwise arithmetic is slow. Quantized
bitsandbytes layers are called as modules. A GGUF on the CPU comes with its matrices already
packed for the CPU's int4 / int8 kernels (engine/packed.py, backends/gguf_model.py): they are
fused like dense ones, take bf16 activations and give bf16, which the residual adds promote.

On the CPU a decode step is bound by the number of ops more than by bytes (a few microseconds
each, some thousand per token on a 135M model), so the layer is written with few: RoPE looked
up once per pass and applied to q and k together, where a pass's rows sit in the caches worked
out once (`_Rows`). (A lone decode query keeps its causal mask although it sees every key: SDPA
without a mask takes another kernel, and its roundings would make a request's tokens depend on
whether it runs alone or batched.)

Covered: the families of spec.FAMILIES (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3,
phi3, and the mixtures of experts mixtral, qwen2_moe, qwen3_moe, gpt_oss); anything else runs through
transformers' own forward (engine/generic.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from daemon.engine import cpu_kernels
from daemon.engine.attention import allowed, attend, attend_padded, copy_slot_prefix, folded_positions
from daemon.engine.packed import PackedLinear, Product
from daemon.engine.packed import fuse as fuse_products
from daemon.engine.spec import Experts, ExpertWeights, LayerParts, ModelSpec, UnsupportedArchitecture, decoder
from daemon.engine.spec import embed_scale_tensor, rotary_tables, sectioned_rotary, softcap, take_layers
from daemon.engine.vision import Vision



class DenseLinear:
    """y = x W^T + b for one or more float weights fused along the output dimension."""

    def __init__(self, modules: list[torch.nn.Module], weight_dtype: torch.dtype) -> None:
        if len(modules) == 1:  # no copy when the dtype already matches
            self.weight = modules[0].weight.detach().to(weight_dtype).contiguous()
        else:
            self.weight = torch.cat([m.weight.detach().to(weight_dtype) for m in modules]).contiguous()
        biases = [m.bias for m in modules]
        self.bias = torch.cat([b.detach() for b in biases]).to(weight_dtype) if all(b is not None for b in biases) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class ModuleLinear:
    """Quantized layers (bitsandbytes) called as they are; outputs concatenated."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], dim=-1)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules for p in m.parameters())


Linear = Callable[[torch.Tensor], torch.Tensor]


def _is_dense(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear and module.weight.is_floating_point()


def make_linear(modules: list[torch.nn.Module], weight_dtype: torch.dtype) -> DenseLinear | ModuleLinear | Product:
    if all(_is_dense(m) for m in modules):
        return DenseLinear(modules, weight_dtype)
    if all(isinstance(m, PackedLinear) for m in modules):  # a GGUF's blocks on the CPU
        fused = fuse_products([m.product for m in modules])
        if fused is not None:
            return fused
    return ModuleLinear(modules)


AnyLinear = DenseLinear | ModuleLinear | Product


@dataclass
class LayerWeights:
    qkv: AnyLinear
    o: AnyLinear
    norms: LayerParts  # the norm weights (and a MoE layer's router) by role, the modules released
    gate_up: AnyLinear | None = None  # the MLP's, or a MoE layer's shared expert's
    down: AnyLinear | None = None
    experts: ExpertWeights | None = None  # a MoE layer's, in the weight dtype

    @property
    def nbytes(self) -> int:
        products = sum(p.nbytes for p in (self.qkv, self.o, self.gate_up, self.down) if p is not None)
        experts = 0 if self.experts is None else sum(t.numel() * t.element_size() for t in (self.experts.gate_up,
                                                                                          self.experts.down))
        return products + experts


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalize in fp32, cast back, then scale (on the CPU in one C call
    where engine/cpu_kernels.py runs: PyTorch's takes six ops)."""
    if x.dtype == torch.float32:
        kernels = cpu_kernels.load() if x.device.type == "cpu" else None
        if kernels is not None and weight.dtype == torch.float32 and weight.is_contiguous():
            return kernels.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Gemma RMSNorm: normalize and scale by (1 + w), all in fp32, then cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def fp32_scaled_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gpt-oss's RMSNorm: normalize and scale by w in fp32, then cast."""
    h = x.float()
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


NORMS = {"rms": rms_norm, "gemma": gemma_norm, "rms_fp32": fp32_scaled_norm}
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def glu(gate_up: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """act(gate) * up of [..., gate; up] as the spec's family computes it; gpt-oss's clamped
    SwiGLU: gate clamped above and up on both sides at the limit, gate * sigmoid(alpha * gate) * (up + 1)."""
    half = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :half], gate_up[..., half:]
    if spec.activation == "clamped_swiglu":
        gate = gate.clamp(max=spec.glu_limit)
        return gate * torch.sigmoid(gate * spec.glu_alpha) * (up.clamp(-spec.glu_limit, spec.glu_limit) + 1)
    return ACTIVATION_FUNCTIONS[spec.activation](gate) * up


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: HF's rotate_half(x) * sin is roll(x) * signed_sin,
    bit for bit (-x2 * s1 == x2 * -s1), one op fewer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half RoPE on the first cos.shape[-1] dims of each head (partial rotary
    leaves the rest as they are); `sin_signed` from signed_sin."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _swap_halves(x) * sin_signed
    rotated, kept = x[..., :dim], x[..., dim:]
    return torch.cat((rotated * cos + _swap_halves(rotated) * sin_signed, kept), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)  # torch.roll is slower on the CPU


def default_weight_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if device.type == "cpu" and act_dtype == torch.float32:
        return torch.float16
    return act_dtype


# On the CPU a row's attention is computed in a shape that makes it the same bit for bit in any
# pass: alone or batched, as a decode step or anywhere in a prompt chunk (so greedy text is the
# same with the prefix cache on and off, and alone or beside other requests). SDPA's CPU kernel
# works through keys in blocks of up to 512 and query rows in blocks of 32 to 256, and a row's
# rounding changes with the length of the key block its own position falls in and when its query
# block has fewer than 4 rows (measured on torch 2.13: tests/test_gguf_model.py). So the row at
# position p always reads exactly its `key_span(p)` keys, the positions up to p rounded up to
# KEY_GRANULE (those past p masked; the cache holds zeros or older finite values there): the
# rows of a pass are attended in groups that read the same span (a prompt chunk's positions cut
# at the granules, a decode step's rows grouped by their span), and the query heads sharing a
# key head are attended as one run of rows, padded to `padded_query_rows` by repeating the last
# (attention.attend_padded: a decode step's 3 heads per key head on SmolLM2 take 4 rows, not
# 3 x 4). A granule, not SDPA's whole 512 block: the keys a decode step reads are read from
# memory, and a short conversation padded to 512 keys read up to 10 times the bytes it holds.
KEY_GRANULE = 128


def key_span(position: int) -> int:
    """The keys the row at `position` (or its horizon) reads on the CPU: up to it, rounded up."""
    return -(-(position + 1) // KEY_GRANULE) * KEY_GRANULE


def padded_query_rows(rows: int) -> int:
    """Rows of a query block of at least 4 rows in every block SDPA's CPU kernel splits it into:
    at least 4, and past 32 a multiple of 32 (its block sizes are multiples of 32)."""
    return 4 if rows < 4 else rows if rows <= 32 else -(-rows // 32) * 32


@dataclass
class _Read:
    """One attention call of a pass: some of its rows over the same key positions."""

    rows: slice | torch.Tensor | None  # the pass's rows: one sequence's steps, a decode step's batch rows, or all
    keys: int  # key positions read: the pass's end, or a span (key_span) on the CPU
    read: slice | torch.Tensor  # the rows' slots' caches: a slice of slots, else a gather
    # where each row sits in the slice `read` when that has slots no row uses (or holds them out
    # of order): attention runs over the whole slice, which costs less than copying the caches
    spread: torch.Tensor | None = None
    # [B, rows] the position of each query row the call attends (folded and padded on the CPU:
    # attend_padded's rows); None: one sequence's chunk, causal from the bottom right, no mask
    queries: torch.Tensor | None = None
    # one prompt chunk with images whose tokens see each other: the last key each row sees
    # (shaped as `queries`)
    horizons: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None, additive: torch.dtype | None = None) -> torch.Tensor | None:
        """[B, 1, rows, keys] which keys each row sees, per sliding window (computed once a pass);
        B counts the slots of the slice `read` when rows are spread over it. `additive`: as
        0 / -inf in that dtype, the form SDPA would otherwise convert it to in every layer (the
        same bits either way)."""
        if self.queries is None:
            return None
        if (window, additive) not in self._masks:
            if additive is not None:
                seen = self.mask(window)
                self._masks[window, additive] = torch.zeros(seen.shape, dtype=additive, device=seen.device).masked_fill_(
                    ~seen, float("-inf"))
                return self._masks[window, additive]
            positions = self.queries
            if self.spread is not None:  # the slots no row uses attend to their first key, unread
                positions = positions.new_zeros((self.read.stop - self.read.start, *positions.shape[1:])).index_copy_(
                    0, self.spread, positions)
            self._masks[window, None] = allowed(positions, self.keys, window, self.horizons)[:, None]
        return self._masks[window, additive]


@dataclass
class _Rows:
    """Where one pass's rows sit in the KV caches and the calls that attend them: worked out once
    per pass, read by every layer."""

    slots: list[int]
    starts: list[int]
    end: int  # the longest row's cached length after this pass
    reads: list[_Read]
    slot_index: torch.Tensor | None = None  # decode across slots: [B] slots and [B] positions
    positions: torch.Tensor | None = None
    # a decode step read in several groups: the batch row of each of their outputs in order
    order: torch.Tensor | None = None


class ReferenceForward:
    path = "reference"

    def __init__(self, model: torch.nn.Module, num_slots: int, max_ctx: int,
                 weight_dtype: torch.dtype | None = None) -> None:
        """Takes ownership of `model`'s layers: their linear modules are fused here and
        removed from the HF model, which must not be used on its own afterwards."""
        spec = ModelSpec.of(model)
        inner = decoder(model)
        self.spec = spec
        self.config = model.config
        self.device = inner.embed_tokens.weight.device
        # Quantized linears hold uint8 weights: the embedding keeps the compute dtype.
        self.dtype = inner.embed_tokens.weight.dtype
        self.weight_dtype = weight_dtype or default_weight_dtype(self.dtype, self.device)
        self.num_heads, self.num_kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.eps = spec.eps
        self.num_slots = num_slots
        self.max_ctx = max_ctx
        self.vocab_size = spec.vocab
        self.norm = NORMS[spec.norm]
        self.tables = {kind: (cos, signed_sin(sin))
                       for kind, (cos, sin) in rotary_tables(model, spec, max_ctx, self.dtype, self.device).items()}

        self.lm_head = make_linear([model.lm_head], self.weight_dtype)
        embed = inner.embed_tokens.weight.detach()
        tied = isinstance(self.lm_head, DenseLinear) and model.lm_head.weight.data_ptr() == embed.data_ptr()
        # Tied embeddings: look rows up in the (possibly narrower) head copy, keep one table.
        self.embed = self.lm_head.weight if tied else embed
        self.embed_scale = embed_scale_tensor(spec, self.dtype, self.device)
        self.final_norm = inner.norm.weight.detach()
        self.layers = [self._take_layer(parts) for parts in take_layers(model, spec)]

        # one extra slot for encode() (embeddings), never given to a sequence
        # on the CPU in whole key spans, which a pass reads (see KEY_GRANULE)
        self.padded = self.device.type == "cpu"
        self.cache_len = key_span(max_ctx - 1) if self.padded else max_ctx
        shape = (num_slots + 1, self.num_kv_heads, self.cache_len, self.head_dim)
        # torch.empty does not touch the pages, so an idle slot costs address space only.
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # Positions of each slot holding finite values: a batched step reads every slot up to
        # the longest row, and masked-out garbage would still turn 0 * NaN into NaN.
        self._clean = [0] * (num_slots + 1)
        self.vision: Vision | None = None  # a vision model's images (set by its runtime)

    def _take_layer(self, parts: LayerParts) -> LayerWeights:
        products = {role: make_linear(modules, self.weight_dtype) for role, modules in parts.products.items()}
        experts = None
        if parts.experts is not None:  # stacked dense weights (bitsandbytes leaves experts as they are)
            e = parts.experts
            experts = ExpertWeights(*(None if t is None else t.to(self.weight_dtype).contiguous()
                                      for t in (e.gate_up, e.down, e.gate_up_bias, e.down_bias)))
        if not any(isinstance(p, ModuleLinear) for p in products.values()):
            parts.release()  # the fused copies replace the originals: their memory can go
        return LayerWeights(norms=parts, experts=experts, **products)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.k_cache[0].element_size()

    @property
    def weights_bytes(self) -> int:
        dense = sum(w.nbytes for w in self.layers)
        embed = 0 if self.embed is getattr(self.lm_head, "weight", None) else self.embed.numel() * self.embed.element_size()
        return dense + self.lm_head.nbytes + embed

    def _attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: "_Rows") -> torch.Tensor:
        """Write k/v at each row's positions and attend over each row's cache."""
        kc, vc = self.k_cache[layer_index], self.v_cache[layer_index]
        options = dict(scale=self.spec.attn_scale, window=self.spec.windows[layer_index],
                       softcap=self.spec.attn_softcap, sinks=self.layers[layer_index].norms.sinks)
        if rows.positions is None:  # one sequence: plain slices, no gather
            slot, start, end = rows.slots[0], rows.starts[0], rows.end
            kc[slot, :, start:end] = k[0]
            vc[slot, :, start:end] = v[0]
        else:  # decode across slots (steps == 1): scatter the new entries
            kc[rows.slot_index, :, rows.positions] = k[:, :, 0]
            vc[rows.slot_index, :, rows.positions] = v[:, :, 0]
        # on the CPU SDPA takes an additive mask as it is (soft-caps and sinks mask their own scores)
        plain_scores = self.padded and options["softcap"] is None and options["sinks"] is None
        additive = q.dtype if plain_scores else None
        outs = []
        for r in rows.reads:
            part = q if r.rows is None else q[:, :, r.rows] if isinstance(r.rows, slice) else q.index_select(0, r.rows)
            keys, values = kc[r.read, :, :r.keys], vc[r.read, :, :r.keys]
            if r.spread is not None:
                part = part.new_zeros((keys.shape[0], *part.shape[1:])).index_copy_(0, r.spread, part)
            mask = r.mask(options["window"], additive)
            if self.padded:
                o = attend_padded(part, keys, values, mask, r.queries.shape[-1], **options)
            else:
                o = attend(part, keys, values, None, mask=mask, **options)
            outs.append(o if r.spread is None else o.index_select(0, r.spread))
        if len(outs) == 1:
            return outs[0]
        if rows.order is None:  # one sequence's chunk, cut at the key spans
            return torch.cat(outs, dim=2)
        return torch.cat(outs).index_select(0, rows.order)

    def _place(self, slots: list[int], starts: list[int], steps: int, horizons: list[int] | None = None) -> "_Rows":
        """Where this pass's rows go and the calls that attend them, once per pass (and the
        slots' unwritten positions zeroed). `horizons`: one sequence's chunk whose image tokens
        see each other (Vision.horizons)."""
        end = max(starts) + steps
        device = self.device
        if len(slots) == 1:
            slot, start = slots[0], starts[0]
            read = slice(slot, slot + 1)
            if not self.padded:
                seen = None if horizons is None else torch.tensor(horizons, device=device)[None]
                queries = None if seen is None else torch.arange(start, end, device=device)[None]
                self._clean[slot] = max(self._clean[slot], end)
                return _Rows(slots, starts, end, [_Read(None, end, read, queries=queries, horizons=seen)])
            # a chunk cut where its rows' key spans change (each row's horizon, where it has one)
            spans = [key_span(start + i if horizons is None else max(start + i, horizons[i])) for i in range(steps)]
            cuts = [0] + [i for i in range(1, steps) if spans[i] != spans[i - 1]] + [steps]
            reads = []
            for a, b in itertools.pairwise(cuts):
                positions = torch.arange(start + a, start + b, device=device)[None]
                seen = None if horizons is None else torch.tensor(horizons[a:b], device=device)[None]
                reads.append(self._folded_read(slice(a, b) if len(cuts) > 2 else None, spans[a], read, None,
                                               positions, seen))
            self._zero_unwritten(slots, spans[-1])
            return _Rows(slots, starts, end, reads)
        slot_t, start_t = torch.tensor(slots, device=device), torch.tensor(starts, device=device)
        if not self.padded:
            read, spread = self._slot_read(slots, end)
            return _Rows(slots, starts, end, [_Read(None, end, read, spread, start_t[:, None])], slot_t, start_t)
        groups: dict[int, list[int]] = {}  # a decode step's rows by their key span
        for b, start in enumerate(starts):
            groups.setdefault(key_span(start), []).append(b)
        reads = []
        for span, members in groups.items():
            read, spread = self._slot_read([slots[b] for b in members], span)
            picked = None if len(groups) == 1 else torch.tensor(members, device=device)
            positions = start_t[:, None] if picked is None else start_t[picked][:, None]
            reads.append(self._folded_read(picked, span, read, spread, positions, None))
        order = None
        if len(groups) > 1:  # the groups' outputs back in batch order
            flat = [b for members in groups.values() for b in members]
            order = torch.tensor(sorted(range(len(flat)), key=flat.__getitem__), device=device)
        return _Rows(slots, starts, end, reads, slot_t, start_t, order)

    def _folded_read(self, rows: slice | torch.Tensor | None, keys: int, read: slice | torch.Tensor,
                     spread: torch.Tensor | None, positions: torch.Tensor, seen: torch.Tensor | None) -> "_Read":
        """A CPU call over `keys` keys for query rows at `positions` [B, T] (and their horizons):
        the query heads of a key head folded into one padded run of rows (attend_padded)."""
        group = self.num_heads // self.num_kv_heads
        padded = padded_query_rows(group * positions.shape[1])
        return _Read(rows, keys, read, spread, folded_positions(positions, group, padded),
                     None if seen is None else folded_positions(seen, group, padded))

    def _slot_read(self, slots: list[int], keys: int) -> tuple[slice | torch.Tensor, torch.Tensor | None]:
        """How a call reads the caches of `slots` (their unwritten positions up to `keys` zeroed):
        a slice of slots, else a gather; spread over a slice when few of its slots go unused."""
        low, high = min(slots), max(slots) + 1
        read, spread = torch.tensor(slots, device=self.device), None
        if slots == list(range(low, high)):
            read = slice(low, high)
        elif high - low <= 2 * len(slots):  # attend over the slice, the unused slots' rows wasted
            read, spread = slice(low, high), read - low
        # the slice's unused slots too, so that no garbage in them is read as NaN
        self._zero_unwritten(slots if spread is None else range(low, high), keys)
        return read, spread

    def _zero_unwritten(self, slots: list[int], end: int) -> None:
        for slot in slots:
            if self._clean[slot] < end:
                for cache in (*self.k_cache, *self.v_cache):
                    cache[slot, :, self._clean[slot]:end].zero_()
                self._clean[slot] = end

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(self.norm(x, self.final_norm, self.eps)).float(), self.spec.final_softcap)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """tokens [B, T] at positions starts[b] .. starts[b]+T-1 of slots[b]; returns the
        logits of each row's last position, [B, vocab], float32. B > 1 needs T == 1."""
        return self._logits(self._layers(tokens, slots, starts)[:, -1])

    def forward_mixed(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                      chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """A decode step (tokens [B, 1], B may be 0) and prompt chunks (token ids, slot,
        start): the B rows' logits, then each chunk's last, [B + len(chunks), vocab]. On
        this path, one after another."""
        parts = [self.forward(tokens, slots, starts)] if tokens.shape[0] else []
        parts += [self.forward(torch.tensor([ids]), [slot], [start]) for ids, slot, start in chunks]
        return torch.cat(parts)

    def copy_prefix(self, source: int, targets: list[int], length: int) -> None:
        """Slots `targets` take the keys and values of slot `source`'s first `length` positions."""
        copy_slot_prefix([*self.k_cache, *self.v_cache], source, targets, length)
        if self.vision is not None:
            self.vision.copy_rotary(source, targets, length)
        for target in targets:
            self._clean[target] = max(self._clean[target], length)

    def release(self) -> None:
        """Drop the KV caches (the model is unloading)."""
        self.k_cache.clear()
        self.v_cache.clear()

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states [T, hidden] of one sequence (for embeddings), computed in
        the scratch slot."""
        x = self._layers(tokens[None], [self.num_slots], [0])
        return self.norm(x[0], self.final_norm, self.eps).float()

    def _rope(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and signed sin at each row's positions, [B or 1, T, 1, rotary_dim], per layer type:
        looked up once per pass, not once per layer (multimodal rotary: composed per row)."""
        batch, steps = tokens.shape
        if self.vision is not None and self.spec.rotary_sections:
            placed = self.vision.pass_positions([(row, slot, start) for row, slot, start
                                                 in zip(tokens.tolist(), slots, starts)])
            if placed is not None:
                tables = sectioned_rotary(self.tables, torch.from_numpy(placed), self.spec.rotary_sections)
                return {kind: (cos.view(batch, steps, 1, -1), sin.view(batch, steps, 1, -1))
                        for kind, (cos, sin) in tables.items()}
        if batch == 1:
            span = slice(starts[0], starts[0] + steps)
            return {kind: (cos[span][None, :, None], sin[span][None, :, None]) for kind, (cos, sin) in self.tables.items()}
        index = torch.tensor(starts, device=self.device)
        return {kind: (cos[index][:, None, None], sin[index][:, None, None]) for kind, (cos, sin) in self.tables.items()}

    def _layers(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """The decoder, layer by layer: the one place to read how a layer runs on this path."""
        batch, steps = tokens.shape
        spec, norm, eps = self.spec, self.norm, self.eps
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        x = self._embed(tokens)
        ropes = self._rope(tokens, slots, starts)
        horizons = None
        if self.vision is not None and batch == 1 and steps > 1:
            horizons = self.vision.horizons(tokens[0].tolist(), starts[0])
        rows = self._place(slots, starts, steps, horizons)
        for i, w in enumerate(self.layers):
            n = w.norms
            h = norm(x, n.attn_in_norm, eps)
            qkv = w.qkv(h).to(self.dtype).view(batch, steps, heads + 2 * kv_heads, dim)
            cos, sin = ropes[spec.layer_types[i]]
            if spec.qk_norm:
                q = apply_rope(norm(qkv[:, :, :heads], n.q_norm, eps), cos, sin)
                k = apply_rope(norm(qkv[:, :, heads:heads + kv_heads], n.k_norm, eps), cos, sin)
            else:  # q and k rotated together: one set of ops for both
                qk = apply_rope(qkv[:, :, :heads + kv_heads], cos, sin)
                q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = qkv[:, :, heads + kv_heads:]
            o = self._attention(i, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rows)
            # a product's output in a narrower dtype is added as it is: the add promotes it exactly
            o = w.o(o.transpose(1, 2).reshape(batch, steps, heads * dim))
            x = x + (norm(o.to(self.dtype), n.attn_out_norm, eps) if spec.sandwich else o)
            h = norm(x, n.mlp_in_norm, eps)
            m = self._mlp(h, w) if w.experts is None else self._experts(h, w)
            x = x + (norm(m.to(self.dtype), n.mlp_out_norm, eps) if spec.sandwich else m)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ids' embeddings (an image's virtual ids: its features, through `vision`)."""

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            x = F.embedding(ids.to(self.device), self.embed).to(self.dtype)
            return x if self.embed_scale is None else x * self.embed_scale

        return lookup(tokens) if self.vision is None else self.vision.embed(tokens, lookup)

    def _mlp(self, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        return w.down(glu(w.gate_up(h).to(self.dtype), self.spec))

    def _experts(self, h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """A MoE layer as transformers computes it: each token's top-k experts by the router's
        softmax, each expert hit run once over its tokens in expert order, outputs scaled by the
        routing weights and summed into zeros (so the sums round as HF's do), plus the shared
        expert. One expert at a time: this path is the CPU's and the check of the fast one."""
        moe, experts = self.spec.experts, w.experts
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = route(flat, w.norms.router, moe, w.norms.router_bias)
        out = torch.zeros_like(flat)
        by_slot = chosen.T  # [top_k, tokens]: HF walks each expert's tokens by rank, then position
        biased = experts.gate_up_bias is not None
        for expert in chosen.unique().tolist():
            rank, rows = torch.where(by_slot == expert)
            gate_up = F.linear(flat[rows].to(experts.gate_up.dtype), experts.gate_up[expert],
                               experts.gate_up_bias[expert] if biased else None).to(self.dtype)
            y = F.linear(glu(gate_up, self.spec).to(experts.down.dtype), experts.down[expert],
                         experts.down_bias[expert] if biased else None).to(self.dtype)
            out.index_add_(0, rows, (y * weights[rows, rank, None]).to(out.dtype))
        if moe.shared:
            shared = self._mlp(flat, w).to(self.dtype)
            out = out + torch.sigmoid(w.norms.shared_gate(flat)) * shared
        return out.view(h.shape)


def route(x: torch.Tensor, router: torch.Tensor, moe: Experts,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-k experts and their weights, [rows, top_k] each: softmax over every
    expert's logit in fp32, the top k kept (renormalized where the family does), the weights
    left in fp32 or cast to the activations' dtype as the family does; or (gpt-oss) the top k
    logits, softmaxed in their dtype."""
    logits = F.linear(x, router, bias)
    if moe.softmax_after_topk:
        top, chosen = torch.topk(logits, moe.top_k, dim=-1)
        return torch.softmax(top.float(), dim=-1).to(logits.dtype), chosen
    top, chosen = torch.topk(torch.softmax(logits.float(), dim=-1), moe.top_k, dim=-1)
    if moe.normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return (top if moe.route_in_fp32 else top.to(logits.dtype)), chosen


