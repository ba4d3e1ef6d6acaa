"""Attention over a slot's cache for a run of query positions, in PyTorch: the reference
path's attention, and the fast path's for prompts. Causal, with the layer's sliding window
(keys within `window` positions of each query, as HF's sliding masks: k > q - window) and
Gemma 2's soft-capped scores where the spec has them; SDPA does the work unless scores must
be soft-capped, which SDPA cannot do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def allowed(q_positions: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    """[..., T, keys] booleans: which keys each query position sees."""
    k = torch.arange(keys, device=q_positions.device)
    mask = k <= q_positions[..., None]
    if window is not None:
        mask &= k > q_positions[..., None] - window
    return mask


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor | None, *,
           scale: float, window: int | None = None, softcap: float | None = None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, D] at absolute positions q_positions [B, T], or None for a prompt chunk: the
    keys' last T positions; keys / values [B, KV, S, D] holding positions 0..S-1. Returns
    [B, H, T, D]. A chunk without a window needs no mask: causal from the bottom right
    (`causal_lower_right`), which the flash and memory-efficient kernels take as it is.
    `mask`: allowed(q_positions, S, window)[:, None] made once for the layers of a pass."""
    gqa = keys.shape[1] != q.shape[1]
    steps, length = q.shape[2], keys.shape[2]
    if q_positions is None and mask is None:
        if softcap is None and window is None:
            causal = causal_lower_right(steps, length) if steps != length else None
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, is_causal=causal is None,
                                                  scale=scale, enable_gqa=gqa)
        q_positions = torch.arange(length - steps, length, device=q.device)[None]
    if mask is None:
        mask = allowed(q_positions, length, window)[:, None]
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def attend_padded(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, rows: int, *,
                  scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """`attend` for q [B, H, T, D] in the shape in which the reference path attends on the CPU
    (engine/forward.py, KEY_BLOCK): the query heads that share a key head folded into one run
    of rows per key head, head by head ([B, KV, H/KV * T, D]: a decode step's heads make a
    block of rows together, and no key head is repeated), then padded to `rows` rows by
    repeating the last one. `mask` [B, 1, rows, S] is made for those rows (`folded_positions`).
    Returns [B, H, T, D]."""
    b, h, t, d = q.shape
    kv = keys.shape[1]
    folded = q.reshape(b, kv, h // kv * t, d)
    if rows > folded.shape[2]:
        folded = torch.cat((folded, folded[:, :, -1:].expand(b, kv, rows - folded.shape[2], d)), dim=2)
    out = attend(folded, keys, values, None, scale=scale, window=window, softcap=softcap, mask=mask)
    return out[:, :, :h // kv * t].reshape(b, h, t, d)


def folded_positions(positions: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """[B, rows]: the position of each row `attend_padded` attends, from the queries' positions
    [B, T] and the query heads per key head: T positions once per head, then the last again."""
    tiled = positions.repeat(1, group)
    return torch.cat((tiled, tiled[:, -1:].expand(-1, rows - tiled.shape[1])), dim=1)


def copy_slot_prefix(caches: list[torch.Tensor], source: int, target: int, length: int) -> None:
    """Copy the first `length` positions of slot `source` into slot `target` in every layer's
    [slots, kv_heads, ctx, head_dim] key or value cache: a prefix one prompt reuses from another."""
    for cache in caches:
        cache[target, :, :length].copy_(cache[source, :, :length])
