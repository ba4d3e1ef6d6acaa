"""Prefix reuse: which KV slot a new prompt takes, and how much of it need not be prefilled.

A slot's cache keeps the keys and values of the tokens last fed through it after its request
ends, as Ollama's runner and llama.cpp's server keep theirs (`cache_prompt`): a conversation's
next turn, which resends everything before it, finds its earlier turns there. Beyond them, a
prompt also takes a prefix from any other slot, copied into its own (one device copy per
layer, far cheaper than computing it): from a free slot, from a running sequence, or from a
prompt still being prefilled, which it then waits for, so that concurrent requests sharing a
system prompt or a document compute it once (vLLM's automatic prefix caching and SGLang's
RadixAttention share blocks instead; with whole-context slots a copy does the same job).

The key is the exact token ids, so a prefix is reused only where the template, the system
prompt and every earlier token agree; the cache lives in the model's KV slots, so it goes with
a reload (a changed num_ctx reloads), and costs no memory beyond the slots the scheduler
already counts. A free slot's tokens are evicted when a prompt needs its slot: the least
recently used one goes first.

This module is the policy, in plain Python; the runner applies it and the forward models copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# A prompt waits for a prefix still being computed only when that saves at least this many
# tokens over what it can take at once: below it, prefilling them itself costs less than the
# wait (at least one pass).
FOLLOW_MIN_TOKENS = 32


def token_array(tokens: Sequence[int]) -> np.ndarray:
    """Token ids as the arrays prefixes are compared in (one conversion per prompt or slot)."""
    return tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences: one vectorized compare
    (a plan compares a prompt with every slot: 32 slots sharing a 2,000-token system prompt
    cost 100 ms as Python lists, a few as arrays)."""
    a, b = token_array(a), token_array(b)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


# Prefixes are compared with every holder's first PROBE_TOKENS tokens in one vectorized step;
# only holders that agree that far are compared further (32 prompts admitted at once against 32
# free slots cost 1,000 compares of a few us each: 15 ms before the first pass).
PROBE_TOKENS = 64


def common_prefixes(prompt: Sequence[int], others: Sequence[Sequence[int]]) -> list[int]:
    """common_prefix(prompt, other) for each of `others`."""
    if not others:
        return []
    prompt = token_array(prompt)
    probe = prompt[:PROBE_TOKENS]
    width = len(probe)
    heads = np.full((len(others), width), -1, dtype=np.int64)  # -1: past an other's end, no token
    for row, other in enumerate(others):
        n = min(width, len(other))
        heads[row, :n] = other[:n]
    differ = heads != probe
    first = np.where(differ.any(axis=1), differ.argmax(axis=1), width)
    return [int(f) if f < width or len(other) <= width or len(prompt) <= width else common_prefix(prompt, other)
            for f, other in zip(first, others)]


@dataclass(frozen=True)
class Holder:
    """Tokens whose keys and values a slot holds, or will: `tokens[:ready]` are in it now; a
    prompt still prefilling holds `ready` of its `tokens`. `owner` is the sequence behind a busy
    slot (None for a free one), what a waiting prompt follows."""

    slot: int
    tokens: Sequence[int]
    ready: int
    owner: object | None = None


@dataclass(frozen=True)
class Reuse:
    """Where a prompt goes: `slot` (its own), with `length` tokens of its prompt taken from
    `source` (copied first, unless it is `slot` itself), or, when `leader` is set, to be copied
    from the leader's slot once the leader has computed `length` of them."""

    slot: int
    length: int = 0
    source: int | None = None
    leader: object | None = None

    @property
    def copies(self) -> bool:
        return self.leader is None and self.source is not None and self.source != self.slot and self.length > 0


class SlotCache:
    """What every free slot holds and when each was last used; the choice of slot and source."""

    def __init__(self, num_slots: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._held: list[np.ndarray] = [token_array(()) for _ in range(num_slots)]
        self._used = [0] * num_slots  # a clock, not time: least recently used = smallest
        self._clock = 0

    def held(self, slot: int) -> list[int]:
        return self._held[slot].tolist()

    def keep(self, slot: int, tokens: Sequence[int]) -> None:
        """A slot's request ended: these tokens' keys and values stay in it for the next one."""
        self._clock += 1
        self._used[slot] = self._clock
        self._held[slot] = token_array(tokens if self.enabled else ())

    def take(self, slot: int) -> None:
        """A request has the slot now: what it held is its holder's business until it is kept."""
        self._clock += 1
        self._used[slot] = self._clock
        self._held[slot] = token_array(())

    def cached_tokens(self) -> int:
        return sum(len(h) for h in self._held)

    def free_holders(self, free: Sequence[int]) -> list[Holder]:
        return [Holder(s, self._held[s], len(self._held[s])) for s in free if len(self._held[s])]

    def plan(self, prompt: Sequence[int], free: Sequence[int], busy: Sequence[Holder] = ()) -> Reuse:
        """The slot for a new prompt (one of `free`, which must not be empty) and what it reuses.
        The last prompt token is always evaluated: its logits are the first sample."""
        lru = min(free, key=lambda s: self._used[s])
        if not self.enabled:
            return Reuse(lru)
        usable = len(prompt) - 1
        prompt = token_array(prompt)
        now, now_from, wait, wait_for = 0, None, 0, None
        holders = [*self.free_holders(free), *busy]
        for holder, shared in zip(holders, common_prefixes(prompt, [h.tokens for h in holders])):
            shared = min(shared, usable)
            if min(shared, holder.ready) > now:
                now, now_from = min(shared, holder.ready), holder
            if shared > holder.ready and holder.owner is not None and shared > wait:
                wait, wait_for = shared, holder
        if wait_for is not None and wait - now >= FOLLOW_MIN_TOKENS:
            return Reuse(lru, wait, wait_for.slot, leader=wait_for.owner)
        if now_from is None:
            return Reuse(lru)
        if now_from.owner is None and 2 * now >= len(now_from.tokens):
            # a free slot whose tokens are mostly this prompt's prefix (the next turn of its
            # conversation): take it as it is, no copy, nothing else evicted
            return Reuse(now_from.slot, now, now_from.slot)
        return Reuse(lru, now, now_from.slot)
