"""The model's forward pass for the Llama family, over the HF model's own weights.

transformers loads the weights (safetensors, GGUF, bitsandbytes NF4/FP4/int8); `LlamaForward`
takes them over, fuses q/k/v and gate/up into single matrix products, and runs them with a
KV cache of `num_slots` independent sequences, so one decode step carries several requests
at different positions (gpt-fast's prefill / decode split).

Dtypes: activations (residual stream, norms, attention, KV cache) run in the model's compute
dtype; dense linear weights may be stored narrower. On the CPU they are kept in fp16 while
activations stay fp32: decoding reads every weight once per token, AVX2 CPUs multiply fp16
weights at full memory bandwidth, and their fp16 elementwise arithmetic is slow. Quantized
bitsandbytes layers are called as modules.

Covered: llama, mistral, qwen2 (q/k/v biases), qwen3 (q/k norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class UnsupportedArchitecture(ValueError):
    pass


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


def make_linear(modules: list[torch.nn.Module], weight_dtype: torch.dtype) -> DenseLinear | ModuleLinear:
    if all(_is_dense(m) for m in modules):
        return DenseLinear(modules, weight_dtype)
    return ModuleLinear(modules)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: DenseLinear | ModuleLinear
    o: DenseLinear | ModuleLinear
    gate_up: DenseLinear | ModuleLinear
    down: DenseLinear | ModuleLinear
    q_norm: torch.nn.Module | None = None
    k_norm: torch.nn.Module | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalize in fp32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def default_weight_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if device.type == "cpu" and act_dtype == torch.float32:
        return torch.float16
    return act_dtype


class LlamaForward:
    def __init__(self, model: torch.nn.Module, num_slots: int, max_ctx: int,
                 weight_dtype: torch.dtype | None = None) -> None:
        """Takes ownership of `model`'s layers: their linear modules are fused here and
        removed from the HF model, which must not be used on its own afterwards."""
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"architecture {config.model_type!r} is not supported yet "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_ctx:
            raise UnsupportedArchitecture(f"sliding-window attention (window {window}) is not supported yet")
        inner = model.model
        self.config = config
        self.device = inner.embed_tokens.weight.device
        # Quantized linears hold uint8 weights: the embedding keeps the compute dtype.
        self.dtype = inner.embed_tokens.weight.dtype
        self.weight_dtype = weight_dtype or default_weight_dtype(self.dtype, self.device)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.num_slots = num_slots
        self.max_ctx = max_ctx
        self.vocab_size = config.vocab_size
        self.gqa = self.num_kv_heads != self.num_heads
        self.act = F.silu if config.hidden_act == "silu" else _hf_activation(config.hidden_act)

        self.lm_head = make_linear([model.lm_head], self.weight_dtype)
        embed = inner.embed_tokens.weight.detach()
        tied = isinstance(self.lm_head, DenseLinear) and model.lm_head.weight.data_ptr() == embed.data_ptr()
        # Tied embeddings: look rows up in the (possibly narrower) head copy, keep one table.
        self.embed = self.lm_head.weight if tied else embed
        self.final_norm = inner.norm.weight.detach()
        self.layers = [self._take_layer(layer) for layer in inner.layers]

        # one extra slot for encode() (embeddings), never given to a sequence
        shape = (num_slots + 1, self.num_kv_heads, max_ctx, self.head_dim)
        # torch.empty does not touch the pages, so an idle slot costs address space only.
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        # Positions of each slot holding finite values: a batched step reads every slot up to
        # the longest row, and masked-out garbage would still turn 0 * NaN into NaN.
        self._clean = [0] * (num_slots + 1)
        positions = torch.arange(max_ctx, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_ctx, head_dim]

    def _take_layer(self, layer: torch.nn.Module) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        weights = LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            qkv=make_linear([attn.q_proj, attn.k_proj, attn.v_proj], self.weight_dtype),
            o=make_linear([attn.o_proj], self.weight_dtype),
            gate_up=make_linear([mlp.gate_proj, mlp.up_proj], self.weight_dtype),
            down=make_linear([mlp.down_proj], self.weight_dtype),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
        )
        # The fused copies replace the originals: drop them so their memory can go.
        if isinstance(weights.qkv, DenseLinear):
            del attn.q_proj, attn.k_proj, attn.v_proj
        if isinstance(weights.o, DenseLinear):
            del attn.o_proj
        if isinstance(weights.gate_up, DenseLinear):
            del mlp.gate_proj, mlp.up_proj
        if isinstance(weights.down, DenseLinear):
            del mlp.down_proj
        return weights

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.k_cache[0].element_size()

    @property
    def weights_bytes(self) -> int:
        dense = sum(w.qkv.nbytes + w.o.nbytes + w.gate_up.nbytes + w.down.nbytes for w in self.layers)
        embed = 0 if self.embed is getattr(self.lm_head, "weight", None) else self.embed.numel() * self.embed.element_size()
        return dense + self.lm_head.nbytes + embed

    def _attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slots: list[int], starts: list[int]) -> torch.Tensor:
        """Write k/v at each row's positions and attend over each row's cache."""
        steps = q.shape[2]
        kc, vc = self.k_cache[layer_index], self.v_cache[layer_index]
        if len(slots) == 1:  # one sequence: plain slices, no gather
            slot, start = slots[0], starts[0]
            end = start + steps
            if layer_index == 0:
                self._clean[slot] = max(self._clean[slot], end)
            kc[slot, :, start:end] = k[0]
            vc[slot, :, start:end] = v[0]
            keys, values = kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end]
            mask, causal = None, False
            if steps > 1 and start == 0:
                causal = True
            elif steps > 1:
                q_pos = start + torch.arange(steps, device=q.device)
                mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.gqa)
        # decode across slots (steps == 1): scatter the new entries, gather the caches
        if layer_index == 0:
            self._zero_unwritten(slots, max(starts) + 1)
        slot_t = torch.tensor(slots, device=self.device)
        start_t = torch.tensor(starts, device=self.device)
        kc[slot_t, :, start_t] = k[:, :, 0]
        vc[slot_t, :, start_t] = v[:, :, 0]
        end = max(starts) + 1
        keys, values = kc[slot_t, :, :end], vc[slot_t, :, :end]
        mask = (torch.arange(end, device=q.device)[None, :] <= start_t[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)

    def _zero_unwritten(self, slots: list[int], end: int) -> None:
        for slot in slots:
            if self._clean[slot] < end:
                for cache in (*self.k_cache, *self.v_cache):
                    cache[slot, :, self._clean[slot]:end].zero_()
                self._clean[slot] = end

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """tokens [B, T] at positions starts[b] .. starts[b]+T-1 of slots[b]; returns the
        logits of each row's last position, [B, vocab], float32. B > 1 needs T == 1."""
        x = self._layers(tokens, slots, starts)
        x = rms_norm(x[:, -1], self.final_norm, self.eps)
        return self.lm_head(x).float()

    def forward_mixed(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                      chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """A decode step (tokens [B, 1], B may be 0) and prompt chunks (token ids, slot,
        start): the B rows' logits, then each chunk's last, [B + len(chunks), vocab]. On
        this path, one after another."""
        parts = [self.forward(tokens, slots, starts)] if tokens.shape[0] else []
        parts += [self.forward(torch.tensor([ids]), [slot], [start]) for ids, slot, start in chunks]
        return torch.cat(parts)

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states [T, hidden] of one sequence (for embeddings), computed in
        the scratch slot."""
        x = self._layers(tokens[None], [self.num_slots], [0])
        return rms_norm(x[0], self.final_norm, self.eps).float()

    def _layers(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        batch, steps = tokens.shape
        tokens = tokens.to(self.device)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if batch == 1:
            cos = self.cos[starts[0]:starts[0] + steps][None, :, None]
            sin = self.sin[starts[0]:starts[0] + steps][None, :, None]
        else:
            index = torch.tensor(starts, device=self.device)
            cos, sin = self.cos[index][:, None, None], self.sin[index][:, None, None]
        x = F.embedding(tokens, self.embed).to(self.dtype)
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, self.eps)
            qkv = w.qkv(h).to(self.dtype).view(batch, steps, heads + 2 * kv_heads, dim)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
            if w.q_norm is not None:
                qk = torch.cat((w.q_norm(qk[:, :, :heads]), w.k_norm(qk[:, :, heads:])), dim=2)
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k in one pass
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            o = self._attention(i, q, k, v.transpose(1, 2), slots, starts)
            x = x + w.o(o.transpose(1, 2).reshape(batch, steps, heads * dim)).to(self.dtype)
            h = rms_norm(x, w.post_norm, self.eps)
            gate, up = w.gate_up(h).to(self.dtype).chunk(2, dim=-1)
            x = x + w.down(self.act(gate) * up).to(self.dtype)
        return x


def _hf_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    return ACT2FN[name]
