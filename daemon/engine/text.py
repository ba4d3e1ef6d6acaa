"""Tokens to text for one stream: incremental detokenizing and stop strings.

The detokenizer (after TGI's decode_token) decodes a sliding window and emits only the new
suffix, holding back while the text ends in an incomplete UTF-8 sequence (U+FFFD), so a
stream never carries half a character. The stop matcher holds back any tail that could be
the start of a stop string until it can no longer match, and trims the stop string.
"""

from __future__ import annotations

from typing import Protocol, Sequence

_PROMPT_CONTEXT = 5  # prompt tokens kept as left context, so leading spaces decode right


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            # drop what no longer serves as context
            drop = self._read
            self._ids = self._ids[drop:] if drop > 0 else self._ids
            self._prefix, self._read = 0, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        hit = -1
        for stop in self._stops:
            i = self._pending.find(stop)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            out, self._pending = self._pending[:hit], ""
            return out, True
        hold = self._longest_partial()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def _longest_partial(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
