"""Attention over a slot's cache for a run of query positions, in PyTorch: the reference
path's attention, and the fast path's for prompts. Causal, with the layer's sliding window
(keys within `window` positions of each query, as HF's sliding masks: k > q - window) and
Gemma 2's soft-capped scores and gpt-oss's sinks (a per-head logit in every softmax's sum, whose
value is zero) where the spec has them; SDPA does the work unless scores must be soft-capped or
sunk, which SDPA cannot do: those are computed in fp32, in chunks of query rows that bound the
scores' memory."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def allowed(q_positions: torch.Tensor, keys: int, window: int | None,
            horizons: torch.Tensor | None = None) -> torch.Tensor:
    """[..., T, keys] booleans: which keys each query position sees. `horizons` (the shape of
    q_positions): the last key each query sees where that is not its own position (an image
    token of a model whose image tokens see each other: its image's last)."""
    k = torch.arange(keys, device=q_positions.device)
    mask = k <= (q_positions if horizons is None else horizons)[..., None]
    if window is not None:
        mask &= k > q_positions[..., None] - window
    return mask


# the explicit scores (soft-caps, sinks) of this many elements at most at a time: query rows in chunks
SCORES_CHUNK = 1 << 26


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor | None, *,
           scale: float, window: int | None = None, softcap: float | None = None,
           mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, D] at absolute positions q_positions [B, T], or None for a prompt chunk: the
    keys' last T positions; keys / values [B, KV, S, D] holding positions 0..S-1. Returns
    [B, H, T, D]. A chunk without a window needs no mask: causal from the bottom right
    (`causal_lower_right`), which the flash and memory-efficient kernels take as it is.
    `mask`: allowed(q_positions, S, window)[:, None] made once for the layers of a pass.
    `sinks`: [H] logits, one per query head (or already [1, H, T, 1] for q's rows)."""
    gqa = keys.shape[1] != q.shape[1]
    steps, length = q.shape[2], keys.shape[2]
    if q_positions is None and mask is None:
        if softcap is None and window is None and sinks is None:
            causal = causal_lower_right(steps, length) if steps != length else None
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, is_causal=causal is None,
                                                  scale=scale, enable_gqa=gqa)
        q_positions = torch.arange(length - steps, length, device=q.device)[None]
    if mask is None:
        mask = allowed(q_positions, length, window)[:, None]
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    if sinks is not None and sinks.dim() == 1:
        sinks = sinks.view(1, -1, 1, 1)
    chunk = max(1, SCORES_CHUNK // max(1, q.shape[0] * q.shape[1] * length))
    outs = []
    for r in range(0, steps, chunk):
        rows = slice(r, r + chunk)
        scores = torch.matmul(q[:, :, rows].float(), keys.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask[:, :, rows] if mask.shape[2] > 1 else ~mask, float("-inf"))
        if sinks is None:
            probs = torch.softmax(scores, dim=-1)
        else:  # the sink joins the sum, then its column goes
            sink = sinks.float()[:, :, rows] if sinks.shape[2] > 1 else sinks.float()
            sink = sink.expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        outs.append(torch.matmul(probs.to(values.dtype), values))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attend_padded(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, rows: int, *,
                  scale: float, window: int | None = None, softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """`attend` for q [B, H, T, D] in the shape in which the reference path attends on the CPU
    (engine/forward.py, KEY_GRANULE): the query heads that share a key head folded into one run
    of rows per key head, head by head ([B, KV, H/KV * T, D]: a decode step's heads make a
    block of rows together, and no key head is repeated), then padded to `rows` rows by
    repeating the last one. `mask` [B, 1, rows, S] is made for those rows (`folded_positions`).
    Returns [B, H, T, D]."""
    b, h, t, d = q.shape
    kv = keys.shape[1]
    folded = q.reshape(b, kv, h // kv * t, d)
    if rows > folded.shape[2]:
        folded = torch.cat((folded, folded[:, :, -1:].expand(b, kv, rows - folded.shape[2], d)), dim=2)
    if sinks is not None:  # each folded row's head's sink, the padding's the last head's
        sinks = sinks.view(kv, h // kv).repeat_interleave(t, dim=1)
        sinks = torch.cat((sinks, sinks[:, -1:].expand(kv, rows - sinks.shape[1])), dim=1)[None, :, :, None]
    out = attend(folded, keys, values, None, scale=scale, window=window, softcap=softcap, mask=mask, sinks=sinks)
    return out[:, :, :h // kv * t].reshape(b, h, t, d)


def folded_positions(positions: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """[B, rows]: the position of each row `attend_padded` attends, from the queries' positions
    [B, T] and the query heads per key head: T positions once per head, then the last again."""
    tiled = positions.repeat(1, group)
    return torch.cat((tiled, tiled[:, -1:].expand(-1, rows - tiled.shape[1])), dim=1)


@dataclass
class _Group:
    """Prompt segments of one pass that start at the same position: attended in one call, each
    padded at its end to the longest (`steps` rows), over keys [start + steps) of its slot."""

    start: int
    steps: int
    read: slice | torch.Tensor  # the batch's slots: a slice (spanning unused ones) or a gather
    gather: torch.Tensor | None  # [batch * steps]: the pass row of each padded row (None: one segment)
    rows: slice  # a lone segment's rows in the pass
    # [batch, steps]: the last key each row sees, where a segment's image tokens see each other
    horizons: torch.Tensor | None = None

    def mask(self, window: int | None) -> torch.Tensor | None:
        if self.horizons is None:
            return None
        positions = torch.arange(self.start, self.start + self.steps, device=self.horizons.device)
        return allowed(positions.expand_as(self.horizons), self.start + self.steps, window, self.horizons)[:, None]


class PromptSegments:
    """Attention for a pass's prompt segments (slot, start, length), rows in that order, over
    slot caches [slots, kv_heads, ctx, head_dim] whose segments' keys are written: segments
    with the same start in one call, e.g. 31 prompts taking the rest of a shared system prompt
    after its copy (one SDPA call per layer, not 31, which the host could not launch fast
    enough). A segment padded at its end attends under the causal mask from the bottom right
    as it would alone: its row r sees keys up to start + r; the padding rows see keys past its
    end (finite: the caches start zeroed) and are dropped. `horizons`: segment index -> the last
    key each of its rows sees (Vision.horizons), for segments whose image tokens see each other."""

    def __init__(self, segments: list[tuple[int, int, int]], device: torch.device,
                 horizons: dict[int, list[int]] | None = None) -> None:
        offsets = list(itertools.accumulate((n for _, _, n in segments), initial=0))
        by_start: dict[int, list[int]] = {}
        for i, (_, start, _) in enumerate(segments):
            by_start.setdefault(start, []).append(i)
        self.groups: list[_Group] = []
        place, padded = [0] * offsets[-1], 0  # each pass row's row in the groups' outputs
        for start, members in by_start.items():
            slots = [segments[i][0] for i in members]
            steps = max(segments[i][2] for i in members)
            low, high = min(slots), max(slots) + 1
            if len(members) == 1:
                read, batch, where = slice(low, high), 1, [0]
            elif high - low <= 2 * len(members):  # unused slots in the span: wasted rows, no copy
                read, batch, where = slice(low, high), high - low, [slot - low for slot in slots]
            else:
                read, batch, where = torch.tensor(slots, device=device), len(members), list(range(len(members)))
            gather = None
            if len(members) > 1:
                rows = [offsets[members[0]]] * (batch * steps)
                for i, b in zip(members, where):
                    rows[b * steps:b * steps + segments[i][2]] = range(offsets[i], offsets[i + 1])
                gather = torch.tensor(rows, device=device)
            for i, b in zip(members, where):
                place[offsets[i]:offsets[i + 1]] = range(padded + b * steps, padded + b * steps + segments[i][2])
            first = members[0]
            seen = None
            if horizons and any(i in horizons for i in members):
                grid = [list(range(start, start + steps)) for _ in range(batch)]
                for i, b in zip(members, where):
                    grid[b][:len(horizons.get(i, ()))] = horizons.get(i, ())
                seen = torch.tensor(grid, device=device)
            self.groups.append(_Group(start, steps, read, gather, slice(offsets[first], offsets[first + 1]), seen))
            padded += batch * steps
        identity = padded == offsets[-1] and place == list(range(padded))
        self.order = None if identity else torch.tensor(place, device=device)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float,
               window: int | None = None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [rows, heads, head_dim] of the pass's segments -> [rows, heads * head_dim]."""
        heads, dim = q.shape[1], q.shape[2]
        outs = []
        for g in self.groups:
            if g.gather is None:
                part = q[g.rows].transpose(0, 1)[None]
            else:
                part = q.index_select(0, g.gather).view(-1, g.steps, heads, dim).transpose(1, 2)
            length = g.start + g.steps
            o = attend(part, k_cache[g.read, :, :length], v_cache[g.read, :, :length], None,
                       scale=scale, window=window, softcap=softcap, sinks=sinks, mask=g.mask(window))
            outs.append(o.transpose(1, 2).reshape(-1, heads * dim))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if self.order is None else out.index_select(0, self.order)


def copy_slot_prefix(caches: list[torch.Tensor], source: int, targets: list[int], length: int) -> None:
    """Copy the first `length` positions of slot `source` into each of slots `targets` in every
    layer's [slots, kv_heads, ctx, head_dim] key or value cache: a prefix prompts reuse from
    another (the reference path's; the GPU path copies in one launch a cache: kernels.copy_prefix)."""
    for cache in caches:
        for target in targets:
            cache[target, :, :length].copy_(cache[source, :, :length])
