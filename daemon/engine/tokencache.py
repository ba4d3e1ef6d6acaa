"""Tokenizing a conversation's next turn without tokenizing its past again.

Chat clients resend the whole conversation every turn, so its rendered prompt starts with the
previous turn's prompt; tokenizing all of it again costs more than prefilling the new part
once the prefix cache holds the rest (10 ms for 4,000 tokens, on the GIL's side of the event
loop's threads). `PrefixTokenizer` keeps the tokens and their end offsets of the last prompts
it tokenized; a text that shares a long prefix with one of them keeps that one's tokens up to
a token boundary well before the texts part, and tokenizes only from there.

A token boundary of the old text is a boundary of the new one when tokenization is local
(pre-tokenizers split the text by patterns that look a few characters ahead; BPE and WordPiece
merge within those pieces), and that is checked, not assumed: the tokens of the tail over the
shared stretch after the boundary must be the old tokens with the same ends, or the text is
tokenized whole. Tokenizers that are not local (a SentencePiece dummy prefix, say) fail the
check and lose nothing but the attempt.
"""

from __future__ import annotations

import bisect
import collections
import threading
from array import array
from dataclasses import dataclass
from typing import Any

# below this many shared characters, tokenizing whole costs about what the reuse would
MIN_SHARED_CHARS = 512
# the boundary lies this far before where the texts part: past any pre-tokenizer's look-ahead
BOUNDARY_MARGIN_CHARS = 64
# the tail's tokens that must repeat the old ones (at most, over the shared stretch)
CHECK_CHARS = 48
# what the recent prompts may hold in all (about 40 bytes a token: ids, ends, text)
MAX_HELD_TOKENS = 1 << 20


@dataclass(frozen=True)
class _Tokenized:
    text: str
    ids: list[int]
    ends: array  # each token's end offset in text, non-decreasing


def shared_prefix(a: str, b: str) -> int:
    """Characters two strings share at the start (slice comparisons run as memory compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixTokenizer:
    """`encode(text)` = the tokenizer's own `encode(text, add_special_tokens=False)`, reusing
    the tokens of a recent text with the same beginning. Thread-safe."""

    def __init__(self, tokenizer: Any, capacity: int = 32) -> None:
        self._tokenizer = tokenizer
        self._fast = bool(getattr(tokenizer, "is_fast", False))
        self._recent: collections.OrderedDict[int, _Tokenized] = collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        if not self._fast:
            return self._tokenizer.encode(text, add_special_tokens=False)
        found = self._reuse(text)
        if found is None:
            found = self._whole(text)
        with self._lock:
            self._recent[id(found)] = found
            self._recent.move_to_end(id(found))
            while len(self._recent) > 1 and (len(self._recent) > self._capacity or
                                             sum(len(e.ids) for e in self._recent.values()) > MAX_HELD_TOKENS):
                self._recent.popitem(last=False)
        return list(found.ids)

    def _encode(self, text: str) -> tuple[list[int], array]:
        out = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), array("q", (end for _, end in out["offset_mapping"]))

    def _whole(self, text: str) -> _Tokenized:
        ids, ends = self._encode(text)
        return _Tokenized(text, ids, ends)

    def _reuse(self, text: str) -> _Tokenized | None:
        with self._lock:
            candidates = list(self._recent.values())
        best, shared = None, 0
        for entry in candidates:
            n = shared_prefix(entry.text, text)
            if n > shared:
                best, shared = entry, n
        if best is None or shared < MIN_SHARED_CHARS:
            return None
        if shared == len(text) == len(best.text):
            return best
        keep = bisect.bisect_right(best.ends, shared - BOUNDARY_MARGIN_CHARS)
        if keep == 0:
            return None
        start = best.ends[keep - 1]
        tail_ids, tail_ends = self._encode(text[start:])
        # the tail's tokens over the shared stretch after the boundary are the old ones
        limit = min(shared - 1, start + CHECK_CHARS)
        old = [(best.ids[i], best.ends[i]) for i in range(keep, len(best.ids)) if best.ends[i] <= limit]
        new = [(t, e + start) for t, e in zip(tail_ids, tail_ends) if e + start <= limit]
        if not old or old != new or (len(best.ids) > keep and best.ends[keep] <= start):
            return None
        ids = best.ids[:keep] + tail_ids
        ends = best.ends[:keep] + array("q", (e + start for e in tail_ends))
        return _Tokenized(text, ids, ends)
