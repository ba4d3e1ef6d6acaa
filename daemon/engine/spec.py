"""The model-definition layer: an architecture is data, read once from the HF config.

A decoder-only transformer of the Llama lineage differs from its relatives in a handful of
choices, and each family here is a row of them (exllamav2's `architecture.py` keeps the same
kind of table; llama.cpp's `llama-arch.cpp` the tensor names): how RMSNorm scales (Llama's
`w * norm(x)` rounded first, Gemma's `(1 + w) * norm(x)` in fp32), whether the sublayers'
outputs are normed too (Gemma 2/3's "sandwich" norms), per-head q/k norms (Qwen3, Gemma 3),
the MLP's activation, an embedding scale, the attention scale and soft-caps, the sliding
window of each layer, and what the projections are called (Phi-3 stores q/k/v and gate/up
fused). Everything numeric comes from the config; rotary embeddings come from the model's
own rotary module (llama3, yarn, linear, dynamic, longrope and partial rotary included).

Mixtures of experts are rows too: the MLP of some layers is a router over `Experts.count`
expert MLPs of which each token takes `top_k` (softmax over all experts, the top weights
renormalized where the config says, in fp32 or cast to the compute dtype as the family does),
plus a shared expert gated by a sigmoid where the family has one (Qwen2-MoE). gpt-oss is a row
with more choices: its router has a bias and softmaxes only the top k logits, its experts are
stored transposed with gate and up interleaved and biased, their SwiGLU clamped; its attention
adds a learned per-head "sink" logit to every softmax (as if one more key, whose value is zero),
and its RMSNorm scales in fp32 before rounding.

`ModelSpec.of(model)` is the description both decode paths read; `take_layers(model, spec)`
is the one place that takes the weights over from the HF modules. The paths never branch on
a family's name, only on the spec's fields. A model whose family is not in the table, or
whose config asks for something the table cannot say, runs through transformers' own forward
(`engine/generic.py`); `unsupported` says why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are made: the catalog reads FAMILIES without it
    import torch


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    norm: str = "rms"  # "rms": HF's LlamaRMSNorm; "gemma": x * (1 + w), in fp32; "rms_fp32": x * w in fp32
    sandwich: bool = False  # the attention and MLP outputs are normed before the residual add
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE
    scaled_embedding: bool = False  # embeddings times sqrt(hidden), rounded to the dtype as HF does
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # the attention's input projections
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # the MLP's gate and up projections
    moe: bool = False  # some layers' MLP is a router over experts (Experts)
    route_in_fp32: bool = False  # experts' outputs scaled by the fp32 weights (Mixtral), else cast first
    shared_expert: bool = False  # beside the experts, a dense MLP scaled by sigmoid(a gate) (Qwen2-MoE)
    softmax_after_topk: bool = False  # the router softmaxes its top k logits only (gpt-oss)
    interleaved_experts: bool = False  # experts [E, hidden, 2I], gate and up alternating, with biases (gpt-oss)
    sinks: bool = False  # a learned logit per head joins each attention softmax (gpt-oss)
    rotary_halves: bool = False  # the rotary module gives half a head's cos / sin, used for both halves (gpt-oss)
    activation: str | None = None  # the MLP's activation, where not config.hidden_act's ("clamped_swiglu")


GEMMA = dict(norm="gemma", scaled_embedding=True)
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),  # q/k/v biases: they come with the weights
    # Qwen2's layers inside the multimodal models; their images' multimodal rotary positions
    # are ModelSpec.rotary_sections
    "qwen2_vl": Family(),
    "qwen2_5_vl": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(**GEMMA),
    "gemma2": Family(**GEMMA, sandwich=True),
    "gemma3_text": Family(**GEMMA, sandwich=True, qk_norm=True),
    "gemma3": Family(**GEMMA, sandwich=True, qk_norm=True),  # the text model inside the multimodal one
    "phi3": Family(qkv=("qkv_proj",), gate_up=("gate_up_proj",)),
    "mixtral": Family(moe=True, route_in_fp32=True),
    "qwen2_moe": Family(moe=True, shared_expert=True),  # q/k/v biases: they come with the weights
    "qwen3_moe": Family(qk_norm=True, moe=True),
    "gpt_oss": Family(norm="rms_fp32", moe=True, softmax_after_topk=True, interleaved_experts=True, sinks=True,
                      rotary_halves=True, activation="clamped_swiglu"),
}
# config.hidden_act (or hidden_activation) -> the activation the kernels compute
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "clamped_swiglu": "clamped_swiglu"}


def sparse_layers(layers: int, mlp_only_layers: list[int] | None, step: int | None) -> tuple[bool, ...]:
    """Which layers' MLP is a mixture of experts (Qwen-MoE's mlp_only_layers and decoder_sparse_step;
    every layer where neither is set): the model definition and the memory estimate both read it."""
    dense_only, step = set(mlp_only_layers or ()), step or 1
    return tuple(i not in dense_only and (i + 1) % step == 0 for i in range(layers))


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP, as the family routes it."""

    count: int
    top_k: int
    normalize: bool  # the top-k weights divided by their sum
    route_in_fp32: bool  # Family.route_in_fp32
    shared: bool  # Family.shared_expert
    softmax_after_topk: bool  # Family.softmax_after_topk: the top k logits softmaxed, in their dtype
    interleaved: bool  # Family.interleaved_experts (ExpertWeights.of)
    sparse: tuple[bool, ...]  # per layer: experts, or a dense MLP (Qwen's mlp_only_layers, decoder_sparse_step)

    @classmethod
    def of(cls, config: Any, family: Family, layers: int) -> "Experts":
        count = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        top_k = getattr(config, "num_experts_per_tok", 0) or 0
        if not 0 < top_k <= count:
            raise UnsupportedArchitecture(f"{top_k} of {count} experts per token")
        sparse = sparse_layers(layers, getattr(config, "mlp_only_layers", None), getattr(config, "decoder_sparse_step", 1))
        after = family.softmax_after_topk  # weights that already sum to one are not renormalized
        return cls(count=count, top_k=top_k, normalize=not after and bool(getattr(config, "norm_topk_prob", True)),
                   route_in_fp32=family.route_in_fp32, shared=family.shared_expert, softmax_after_topk=after,
                   interleaved=family.interleaved_experts, sparse=sparse)


@dataclass(frozen=True)
class ModelSpec:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    norm: str
    sandwich: bool
    qk_norm: bool
    activation: str
    embed_scale: float | None  # multiply the embeddings (in the activation dtype)
    attn_scale: float  # the softmax scale of q.k
    attn_softcap: float | None  # scores -> tanh(s / cap) * cap
    final_softcap: float | None  # logits -> tanh(l / cap) * cap
    windows: tuple[int | None, ...]  # per layer: keys within this many positions, or all
    layer_types: tuple[str, ...]  # per layer: which rotary table ("full_attention", "sliding_attention")
    qkv_names: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj"))
    gate_up_names: tuple[str, ...] = field(default=("gate_proj", "up_proj"))
    experts: Experts | None = None  # a mixture of experts
    sinks: bool = False  # Family.sinks
    rotary_halves: bool = False  # Family.rotary_halves
    # multimodal rotary (Qwen2-VL): how many of a head's rotary frequencies turn with each of a
    # token's (time, row, column) positions, in that order (both halves alike); None: one position
    rotary_sections: tuple[int, ...] | None = None
    glu_alpha: float = 1.702  # clamped_swiglu: gate * sigmoid(alpha * gate) * (up + 1), both clamped at limit
    glu_limit: float = 7.0

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelSpec":
        """The spec of a loaded HF causal LM; UnsupportedArchitecture says why there is none."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kind = model.config.model_type
        family = FAMILIES.get(kind) or FAMILIES.get(config.model_type)
        if family is None:
            raise UnsupportedArchitecture(f"no model definition for {kind!r}")
        act_name = family.activation or getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
        activation = ACTIVATIONS.get(act_name)
        if activation is None:
            raise UnsupportedArchitecture(f"activation {act_name!r}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        layer_types = tuple(getattr(config, "layer_types", None) or ("full_attention",) * layers)[:layers]
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        if getattr(config, "layer_types", None):
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        else:  # Mistral: one window for every layer (null in v0.2 and later)
            windows = (window,) * layers
        if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise UnsupportedArchitecture(f"layer types {sorted(set(layer_types))}")
        scalar = getattr(config, "query_pre_attn_scalar", None)
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        if sections is not None and (rope.get("mrope_interleaved") or len(sections) != 3):
            raise UnsupportedArchitecture(f"multimodal rotary sections {sections} (interleaved: Qwen3-VL's)")
        return cls(
            family=kind, hidden=config.hidden_size, layers=layers, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            vocab=config.vocab_size, eps=float(getattr(config, "rms_norm_eps", 1e-6)), norm=family.norm,
            sandwich=family.sandwich, qk_norm=family.qk_norm, activation=activation,
            embed_scale=config.hidden_size ** 0.5 if family.scaled_embedding else None,
            attn_scale=(scalar if scalar else head_dim) ** -0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None) or None,
            final_softcap=getattr(config, "final_logit_softcapping", None) or None,
            windows=windows, layer_types=layer_types, qkv_names=family.qkv, gate_up_names=family.gate_up,
            experts=Experts.of(config, family, layers) if family.moe else None,
            sinks=family.sinks, rotary_halves=family.rotary_halves,
            rotary_sections=tuple(int(n) for n in sections) if sections is not None else None,
            glu_alpha=float(getattr(config, "swiglu_alpha", 1.702)), glu_limit=float(getattr(config, "swiglu_limit", 7.0)),
        )

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows)


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding embed_tokens, layers, norm and rotary_emb (the language model of a
    multimodal checkpoint)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


@dataclass
class LayerParts:
    """One decoder layer's weights as the HF model holds them, named by their role."""

    qkv: list[torch.nn.Module]  # [q, k, v], or one fused [q; k; v]
    o: list[torch.nn.Module]
    gate_up: list[torch.nn.Module]  # [gate, up], or one fused [gate; up]; a MoE layer's shared expert's, or none
    down: list[torch.nn.Module]
    attn_in_norm: torch.Tensor  # before attention
    mlp_in_norm: torch.Tensor  # before the MLP
    attn_out_norm: torch.Tensor | None = None  # sandwich: on the attention's output
    mlp_out_norm: torch.Tensor | None = None  # sandwich: on the MLP's output
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router: torch.Tensor | None = None  # a MoE layer: [experts, hidden]
    router_bias: torch.Tensor | None = None  # [experts] (gpt-oss)
    sinks: torch.Tensor | None = None  # [heads]: each head's sink logit (gpt-oss)
    experts: ExpertWeights | None = None
    shared_gate: torch.nn.Module | None = None  # hidden -> 1: the shared expert's output times sigmoid(gate(h))
    _layer: Any = None

    @property
    def products(self) -> dict[str, list[torch.nn.Module]]:
        roles = {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down}
        return {role: modules for role, modules in roles.items() if modules}

    def release(self) -> None:
        """Drop the HF modules once a path holds its own copies (their memory can go)."""
        attn, mlp = self._layer.self_attn, self._layer.mlp
        for holder in (attn, mlp, getattr(mlp, "shared_expert", None)):
            for name in [n for n, _ in holder.named_children() if n.endswith("_proj")] if holder is not None else ():
                delattr(holder, name)
        if self.experts is not None:
            delattr(mlp, "experts")
        self.qkv = self.o = self.gate_up = self.down = []
        self.experts = None  # a MoE model's bf16 experts go layer by layer, as each is quantized


@dataclass
class ExpertWeights:
    """A MoE layer's experts: every expert's [gate; up] and down stacked, as most families store
    them (gpt-oss's transposed, interleaved ones are put in this layout when taken over)."""

    gate_up: torch.Tensor  # [experts, 2 * intermediate, hidden]
    down: torch.Tensor  # [experts, hidden, intermediate]
    gate_up_bias: torch.Tensor | None = None  # [experts, 2 * intermediate]
    down_bias: torch.Tensor | None = None  # [experts, hidden]

    @classmethod
    def of(cls, module: torch.nn.Module, interleaved: bool = False) -> "ExpertWeights":
        """`interleaved`: gpt-oss's [experts, hidden, 2I] with gate and up in alternate columns
        and down [experts, I, hidden], both with biases."""
        import torch

        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
                and down.dim() == 3):
            raise UnsupportedArchitecture(f"experts stored as {type(module).__name__}")
        gate_up, down = gate_up.detach(), down.detach()
        if not interleaved:
            if gate_up.shape[1] != 2 * down.shape[2]:
                raise UnsupportedArchitecture(f"experts of shapes {tuple(gate_up.shape)} and {tuple(down.shape)}")
            return cls(gate_up, down)
        bias_up, bias_down = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
        if gate_up.shape[2] != 2 * down.shape[1] or bias_up is None or bias_down is None:
            raise UnsupportedArchitecture(f"interleaved experts of shapes {tuple(gate_up.shape)}, {tuple(down.shape)}")
        bias_up = bias_up.detach()
        stacked = torch.cat((gate_up[:, :, 0::2], gate_up[:, :, 1::2]), dim=2).transpose(1, 2).contiguous()
        return cls(stacked, down.transpose(1, 2).contiguous(),
                   torch.cat((bias_up[:, 0::2], bias_up[:, 1::2]), dim=1).contiguous(), bias_down.detach())


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return module.weight.detach()


def take_layers(model: torch.nn.Module, spec: ModelSpec) -> list[LayerParts]:
    """Every decoder layer's weights by role (the one place that knows the HF names)."""
    out = []
    for i, layer in enumerate(decoder(model).layers):
        attn, mlp = layer.self_attn, layer.mlp
        if spec.sandwich:
            norms = dict(attn_in_norm=_weight(layer.input_layernorm), attn_out_norm=_weight(layer.post_attention_layernorm),
                         mlp_in_norm=_weight(layer.pre_feedforward_layernorm),
                         mlp_out_norm=_weight(layer.post_feedforward_layernorm))
        else:
            norms = dict(attn_in_norm=_weight(layer.input_layernorm), mlp_in_norm=_weight(layer.post_attention_layernorm))
        if spec.qk_norm:
            norms.update(q_norm=_weight(attn.q_norm), k_norm=_weight(attn.k_norm))
        if spec.sinks:
            norms.update(sinks=attn.sinks.detach())
        if spec.experts is not None and spec.experts.sparse[i]:
            shared = getattr(mlp, "shared_expert", None) if spec.experts.shared else None
            router = mlp.router if hasattr(mlp, "router") else mlp.gate  # gpt-oss names it router
            bias = getattr(router, "bias", None)
            mlp_parts = dict(router=_weight(router), router_bias=None if bias is None else bias.detach(),
                             experts=ExpertWeights.of(mlp.experts, spec.experts.interleaved),
                             gate_up=[shared.gate_proj, shared.up_proj] if shared is not None else [],
                             down=[shared.down_proj] if shared is not None else [],
                             shared_gate=mlp.shared_expert_gate if shared is not None else None)
        else:
            mlp_parts = dict(gate_up=[getattr(mlp, n) for n in spec.gate_up_names], down=[mlp.down_proj])
        out.append(LayerParts(qkv=[getattr(attn, n) for n in spec.qkv_names], o=[attn.o_proj], _layer=layer,
                              **mlp_parts, **norms))
    return out


def rotary_tables(model: torch.nn.Module, spec: ModelSpec, max_ctx: int, dtype: torch.dtype,
                  device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and sin [max_ctx, rotary_dim] per layer type, from the model's own rotary module(s),
    so every RoPE variant (and its attention scaling) is HF's."""
    import torch

    inner = decoder(model)
    positions = torch.arange(max_ctx, device=device)[None]
    if spec.rotary_sections:  # (time, row, column) positions: transformers before 5.2x takes only [3, B, T]
        positions = positions[None].expand(3, -1, -1)
    probe = torch.zeros(1, dtype=dtype, device=device)
    rotary = inner.rotary_emb
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    tables = {}
    with torch.no_grad():
        for layer_type in sorted(set(spec.layer_types)):
            if takes_type:
                cos, sin = rotary(probe, positions, layer_type)
            elif layer_type == "sliding_attention" and hasattr(inner, "rotary_emb_local"):
                cos, sin = inner.rotary_emb_local(probe, positions)  # Gemma 3 in older transformers
            else:
                cos, sin = rotary(probe, positions)
            while cos.dim() > 2:  # [B, T, dim], or [3, B, T, dim] of equal sections in older transformers
                cos, sin = cos[0], sin[0]
            if spec.rotary_halves:  # applied to each half of the rotated dims: rotate_half's full tables
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            tables[layer_type] = (cos.to(dtype).contiguous(), sin.to(dtype).contiguous())
    rotary_dim = next(iter(tables.values()))[0].shape[-1]
    if rotary_dim > spec.head_dim or rotary_dim % 2:
        raise UnsupportedArchitecture(f"rotary dimension {rotary_dim} for heads of {spec.head_dim}")
    return tables


def sectioned_rotary(tables: dict[str, tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
                     sections: tuple[int, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Multimodal rotary: the tables' rows [T, rotary_dim] for rows at positions [3, T] (time,
    row, column): each frequency from the row of its section's position, as Qwen2-VL's rotary
    module composes them (a frequency's cos and sin depend on its position only, so the plain
    tables hold every value)."""
    import torch

    out = {}
    for kind, (cos, sin) in tables.items():
        half = cos.shape[-1] // 2
        if sum(sections) != half:
            raise UnsupportedArchitecture(f"multimodal rotary sections {sections} for {half} frequencies")
        axis = torch.repeat_interleave(torch.arange(len(sections), device=cos.device),
                                       torch.tensor(sections, device=cos.device))
        pick = torch.cat((axis, axis))[None, None].expand(1, positions.shape[1], -1)
        at = positions.to(cos.device)
        out[kind] = tuple(table[at].gather(0, pick)[0] for table in (cos, sin))
    return out


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else (x / cap).tanh() * cap


def embed_scale_tensor(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """HF multiplies by sqrt(hidden) rounded to the activation dtype: so do we."""
    import torch

    return None if spec.embed_scale is None else torch.tensor(spec.embed_scale, dtype=dtype, device=device)




def engine_for(architecture: str) -> str:
    """Which decoder a model of this architecture runs on: hfollama's own (the fast path on a
    GPU, the reference path on the CPU) or transformers' forward."""
    return "hfollama" if architecture in FAMILIES else "transformers"
