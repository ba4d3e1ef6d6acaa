"""The model's forward pass for the Llama family, over the HF module's own weights.

transformers loads the weights (safetensors, GGUF, bitsandbytes NF4/FP4/int8); this module
runs them with a KV cache of `num_slots` independent sequences, so one decode step can
carry several requests at different positions (gpt-fast's prefill / decode split). The
linear layers are called as modules, so quantized bitsandbytes layers work unchanged.

Covered: llama, mistral, qwen2 (q/k/v biases live in the modules), qwen3 (q/k norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class UnsupportedArchitecture(ValueError):
    pass


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaForward:
    def __init__(self, model: torch.nn.Module, num_slots: int, max_ctx: int) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"architecture {config.model_type!r} is not supported yet "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_ctx:
            raise UnsupportedArchitecture(f"sliding-window attention (window {window}) is not supported yet")
        self.model = model
        self.config = config
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_slots = num_slots
        self.max_ctx = max_ctx
        self.vocab_size = config.vocab_size
        self.device = self.embed.weight.device
        # Quantized linears keep uint8 weights: the activations use the embedding's dtype,
        # which bitsandbytes leaves in the compute dtype.
        self.dtype = self.embed.weight.dtype
        shape = (num_slots, self.num_kv_heads, max_ctx, self.head_dim)
        # torch.empty does not touch the pages, so an idle slot costs address space only.
        self.k_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        positions = torch.arange(max_ctx, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_ctx, head_dim]

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.k_cache[0].element_size()

    def _attention(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slots: torch.Tensor, starts: torch.Tensor, single: int | None, start0: int) -> torch.Tensor:
        """Write k/v at each row's positions and attend over each row's cache."""
        batch, _, steps, _ = q.shape
        kc, vc = self.k_cache[layer_index], self.v_cache[layer_index]
        if single is not None:  # one sequence: plain slices, no gather
            end = start0 + steps
            kc[single, :, start0:end] = k[0]
            vc[single, :, start0:end] = v[0]
            keys, values = kc[single:single + 1, :, :end], vc[single:single + 1, :, :end]
            if steps == 1:
                mask = None
                causal = False
            elif start0 == 0:
                mask, causal = None, True
            else:
                q_pos = start0 + torch.arange(steps, device=q.device)
                mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]
                causal = False
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.num_kv_heads != self.num_heads)
        # decode across slots (steps == 1): scatter the new entries, gather the caches
        kc[slots, :, starts] = k[:, :, 0]
        vc[slots, :, starts] = v[:, :, 0]
        end = int(starts.max()) + 1
        keys, values = kc[slots, :, :end], vc[slots, :, :end]
        mask = (torch.arange(end, device=q.device)[None, :] <= starts[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """tokens [B, T] at positions starts[b] .. starts[b]+T-1 of slots[b]; returns the
        logits of each row's last position, [B, vocab], float32. B > 1 needs T == 1."""
        batch, steps = tokens.shape
        single = slots[0] if batch == 1 else None
        start0 = starts[0]
        slot_t = torch.tensor(slots, device=self.device)
        start_t = torch.tensor(starts, device=self.device)
        if single is not None:
            cos = self.cos[start0:start0 + steps][None, None]
            sin = self.sin[start0:start0 + steps][None, None]
        else:
            cos, sin = self.cos[start_t][:, None, None], self.sin[start_t][:, None, None]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, steps, self.num_heads, self.head_dim)
            k = attn.k_proj(h).view(batch, steps, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(h).view(batch, steps, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = self._attention(i, q, k, v, slot_t, start_t, single, start0)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, steps, self.num_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.norm(x[:, -1:])
        return self.lm_head(x)[:, -1].float()
