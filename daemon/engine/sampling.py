"""Sampling as small pure functions over the rows of a batch (after gpt-fast's
logits_to_probs/sample), so requests with different options share one decode step.

Order (Ollama's Go sampler): penalties -> top_k -> temperature -> softmax -> top_p -> min_p
-> typical_p -> draw. Rows with temperature 0 take the argmax of the penalized logits.

Randomness is counter-based: the draw for a row depends only on (seed, step, token id), via
an integer hash, never on a shared generator's state. A seed therefore gives the same text
whether its request runs alone or beside others, on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daemon.engine.params import SamplingParams

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    typical_p: torch.Tensor  # [B] float
    repeat_penalty: torch.Tensor  # [B] float
    presence_penalty: torch.Tensor  # [B] float
    frequency_penalty: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] long
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    any_penalty: bool
    any_top_p: bool
    any_min_p: bool
    any_typical: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device) -> "SamplingBatch":
        def f(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        greedy = [p.greedy for p in params]
        return cls(
            temperature=f([max(p.temperature, 1e-6) for p in params]),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.long, device=device),
            top_p=f([p.top_p for p in params]),
            min_p=f([p.min_p for p in params]),
            typical_p=f([p.typical_p for p in params]),
            repeat_penalty=f([p.repeat_penalty if p.penalized else 1.0 for p in params]),
            presence_penalty=f([p.presence_penalty if p.penalized else 0.0 for p in params]),
            frequency_penalty=f([p.frequency_penalty if p.penalized else 0.0 for p in params]),
            seeds=torch.tensor([p.seed & ((1 << 62) - 1) for p in params], dtype=torch.long, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            any_penalty=any(p.penalized for p in params),
            any_top_p=any(0.0 < p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            any_typical=any(0.0 < p.typical_p < 1.0 for p in params),
        )


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row seed, row step, token id): [B, K]."""
    s = seeds[:, None]
    x = (_mul32(s & _MASK32, 0x9E3779B1) ^ _mul32((s >> 32) & _MASK32, 0x7FEB352D)) & _MASK32
    x = (x + _mul32(steps[:, None] & _MASK32, 0x85EBCA77)) & _MASK32
    x = (x ^ _mul32(token_ids & _MASK32, 0xC2B2AE3D)) & _MASK32
    # murmur3 finalizer
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    x = x ^ (x >> 16)
    return (x.to(torch.float64) + 0.5).div(2.0**32).to(torch.float32)


def apply_penalties(logits: torch.Tensor, window: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repeat (llama.cpp style: divide positive logits, multiply negative ones), presence
    and frequency penalties over each row's recent tokens. `window` is [B, W] token ids,
    padded with -1."""
    vocab = logits.shape[-1]
    # -1 pads the window; an image's virtual ids (past the vocabulary) are not text to penalize
    ids = torch.where((window < 0) | (window >= vocab), torch.full_like(window, vocab), window)
    counts = torch.zeros(logits.shape[0], vocab + 1, device=logits.device, dtype=logits.dtype)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    seen = counts > 0
    rp = batch.repeat_penalty[:, None]
    penalized = torch.where(logits > 0, logits / rp, logits * rp)
    logits = torch.where(seen, penalized, logits)
    return logits - batch.presence_penalty[:, None] * seen - batch.frequency_penalty[:, None] * counts


def top_k_candidates(logits: torch.Tensor, top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best logits, sorted descending, with entries past its own k set to -inf."""
    vocab = logits.shape[-1]
    kmax = vocab if bool((top_k <= 0).any()) else min(int(top_k.max()), vocab)
    values, indices = logits.topk(kmax, dim=-1)
    limit = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k)
    beyond = torch.arange(kmax, device=logits.device)[None, :] >= limit[:, None]
    return values.masked_fill(beyond, float("-inf")), indices


def top_p_keep(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Smallest prefix of the sorted candidates whose mass reaches top_p (at least one)."""
    before = probs.cumsum(-1) - probs
    keep = before < top_p[:, None]
    keep[:, 0] = True
    return keep | (top_p[:, None] >= 1.0)


def min_p_keep(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return probs >= min_p[:, None] * probs[:, :1]


def typical_keep(probs: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy
    until their mass reaches typical_p."""
    logp = torch.log(probs.clamp_min(1e-30))
    entropy = -(probs * logp).sum(-1, keepdim=True)
    distance = (-logp - entropy).abs().masked_fill(probs <= 0, float("inf"))
    order = distance.argsort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < typical_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | (typical_p[:, None] >= 1.0)


def sample(logits: torch.Tensor, batch: SamplingBatch, steps: torch.Tensor,
           window: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row. logits [B, V] float32; steps [B] = tokens generated so far."""
    if batch.any_penalty and window is not None:
        logits = apply_penalties(logits, window, batch)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    values, indices = top_k_candidates(logits, batch.top_k)
    probs = torch.softmax(values / batch.temperature[:, None], dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if batch.any_top_p:
        keep &= top_p_keep(probs, batch.top_p)
    if batch.any_min_p:
        keep &= min_p_keep(probs, batch.min_p)
    probs = probs * keep
    if batch.any_typical:
        probs = probs / probs.sum(-1, keepdim=True)
        probs = probs * typical_keep(probs, batch.typical_p)
    noise = -torch.log(counter_uniform(batch.seeds, steps, indices))
    choice = (probs / noise).argmax(dim=-1)
    sampled = indices.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model (before sampling filters) of the chosen tokens and
    of each row's top_n alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    top_values, top_ids = logp.topk(max(top_n, 1), dim=-1)
    return chosen, top_values, top_ids
