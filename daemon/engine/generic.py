"""Any causal LM transformers can run, through transformers' own forward: nothing it can load
is refused for want of a model definition (engine/spec.py), only slower.

Each slot keeps its own HF cache (DynamicCache, or whatever the model makes) and the token
ids it holds. A step runs the model once per sequence in it, one after another: caches of
different lengths do not batch without padding every model's masks its own way, and
correctness comes first here. A slot asked to continue from an earlier position (the runner
discards a step computed past a sequence's end) is cropped where the cache allows it, else
rebuilt from the ids it holds.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from daemon.engine.vision import Vision


class TransformersForward:
    path = "transformers"

    def __init__(self, model: torch.nn.Module, num_slots: int, max_ctx: int) -> None:
        self.model = model.eval()
        self.config = model.config
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.num_slots = num_slots
        self.max_ctx = max_ctx
        self.vocab_size = text.vocab_size
        # one extra slot for encode(), as on the other paths
        self._caches: list[Any] = [None] * (num_slots + 1)
        self._held: list[list[int]] = [[] for _ in range(num_slots + 1)]
        parameters = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache (5.2x); either way it is our object
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last = "logits_to_keep" in parameters
        layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
        head_dim = getattr(text, "head_dim", None) or hidden // max(heads, 1)
        self.vision: Vision | None = None  # a vision model's images (set by its runtime)
        self._kv_bytes = 2 * layers * kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def kv_bytes_per_token(self) -> int:
        return self._kv_bytes

    @property
    def weights_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _new_cache(self) -> Any:
        try:  # with the config, the cache knows the model's sliding and full-attention layers
            return DynamicCache(config=self.config)
        except TypeError:
            return DynamicCache()

    def _cache_at(self, slot: int, start: int) -> Any:
        """The slot's cache holding exactly its first `start` ids."""
        held = self._held[slot]
        if self._caches[slot] is None or start == 0:
            self._caches[slot], self._held[slot] = self._new_cache(), []
            held = self._held[slot]
        if start < len(held):
            cache = self._caches[slot]
            if getattr(cache, "is_croppable", True) and hasattr(cache, "crop"):
                cache.crop(start - len(held))  # negative: tokens to remove, in old and new transformers
                del held[start:]
            else:  # rebuilt from the ids it held
                again = held[:start]
                self._caches[slot], self._held[slot] = self._new_cache(), []
                self._run(slot, again, 0)
        if start != len(self._held[slot]):
            raise ValueError(f"slot {slot} holds {len(self._held[slot])} tokens, not {start}")
        return self._caches[slot]

    def _run(self, slot: int, ids: list[int], start: int) -> torch.Tensor:
        cache = self._cache_at(slot, start)
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        vision = self.vision
        if vision is not None and max(ids) >= vision.first_virtual:
            # an image's rows from its features; the model's own embedding for the text
            kwargs["inputs_embeds"] = vision.embed(torch.tensor([ids]), self.model.get_input_embeddings())
            if vision.bidirectional:  # its image tokens see each other, marked from the sequence's start
                held = self._held[slot] + ids
                kwargs["token_type_ids"] = torch.tensor([[int(t >= vision.first_virtual) for t in held]],
                                                        device=self.device)
        else:
            kwargs["input_ids"] = torch.tensor([ids], device=self.device)
        if vision is not None and vision.multimodal_rotary:  # given: the model would derive them from its last call
            placed = vision.pass_positions([(ids, slot, start)])
            if placed is None:
                placed = np.broadcast_to(np.arange(start, start + len(ids)), (3, len(ids)))
            kwargs["position_ids"] = torch.tensor(placed, device=self.device)[:, None]
        out = self.model(**kwargs)
        self._held[slot].extend(ids)  # the cache grew in place
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """tokens [B, T] at starts[b] of slots[b]: each row's last logits [B, vocab] float32."""
        rows = tokens.tolist()
        return torch.stack([self._run(slot, ids, start) for ids, slot, start in zip(rows, slots, starts)])

    def forward_mixed(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                      chunks: list[tuple[list[int], int, int]]) -> torch.Tensor:
        parts = [self.forward(tokens, slots, starts)] if tokens.shape[0] else []
        with torch.inference_mode():
            parts += [self._run(slot, ids, start)[None] for ids, slot, start in chunks]
        return torch.cat(parts)

    @torch.inference_mode()
    def copy_prefix(self, source: int, targets: list[int], length: int) -> None:
        """Slots `targets` take slot `source`'s first `length` tokens: a copy of its cache,
        cropped (or rebuilt where the cache cannot be cropped)."""
        ids = self._held[source][:length]
        if len(ids) != length:
            raise ValueError(f"slot {source} holds {len(self._held[source])} tokens, not {length}")
        cache = self._caches[source]
        if self.vision is not None:
            self.vision.copy_rotary(source, targets, length)
        for target in targets:
            if getattr(cache, "is_croppable", True) and hasattr(cache, "crop"):
                self._caches[target], self._held[target] = copy.deepcopy(cache), list(self._held[source])
                self._cache_at(target, length)
            else:
                self._caches[target], self._held[target] = None, []
                self._run(target, ids, 0)

    @torch.inference_mode()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last hidden states [T, hidden] of one sequence (embeddings), without a cache."""
        out = self.model(input_ids=tokens.to(self.device)[None], output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1][0].float()

    def release(self) -> None:
        self._caches = [None] * len(self._caches)
