"""Reused tokens are exactly the tokenizer's own: a conversation's next turn, texts that part
anywhere, special tokens, whitespace runs, several tokenizer kinds."""

from __future__ import annotations

import random

import pytest

from daemon.engine.tokencache import PrefixTokenizer, shared_prefix
from tinymodels import build_tokenizer

WORDS = ["the", "sea", " ", "  ", "\n", "\n\n", "Paris", "é", "日本", "🙂", "123", "4.5", "--", "<|im_start|>",
         "<|im_end|>", "user", "assistant", "don't", "x" * 30, "\t", "a,b", "(c)", "{\"k\": 1}"]


def bench_tokenizer(tmp_path):
    from bench.dummy_models import write_tokenizer
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path, 5000, 1, 2)
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.fixture(params=["bpe-bytelevel", "wordlevel"])
def tokenizer(request, tmp_path):
    return build_tokenizer() if request.param == "bpe-bytelevel" else bench_tokenizer(tmp_path)


def text(rng: random.Random, n: int, wordlevel: bool) -> str:
    if wordlevel:
        return " ".join(f"t{rng.randrange(3, 5000)}" for _ in range(n))
    return "".join(rng.choice(WORDS) for _ in range(n))


@pytest.mark.parametrize("seed", range(12))
def test_the_same_tokens_as_tokenizing_whole(tokenizer, seed):
    rng = random.Random(seed)
    wordlevel = "t1" in tokenizer.get_vocab()
    cached = PrefixTokenizer(tokenizer)
    conversation = text(rng, 400, wordlevel)
    for _ in range(8):
        if rng.random() < 0.3:  # an edit somewhere in the middle: the texts part there
            cut = rng.randrange(len(conversation))
            conversation = conversation[:cut] + text(rng, 3, wordlevel) + conversation[cut:]
        conversation += (" " if wordlevel else "") + text(rng, rng.randrange(1, 200), wordlevel)
        assert cached.encode(conversation) == tokenizer.encode(conversation, add_special_tokens=False)
        assert cached.encode(conversation) == tokenizer.encode(conversation, add_special_tokens=False)  # again


def test_the_next_turn_tokenizes_only_its_tail(monkeypatch):
    tokenizer = build_tokenizer()
    cached = PrefixTokenizer(tokenizer)
    rng = random.Random(1)
    first = text(rng, 3000, False)
    cached.encode(first)
    seen = []
    real = cached._encode
    monkeypatch.setattr(cached, "_encode", lambda t: (seen.append(len(t)), real(t))[1])
    second = first + "<|im_start|>user\nand then?<|im_end|>"
    assert cached.encode(second) == tokenizer.encode(second, add_special_tokens=False)
    assert seen and seen[0] < 200  # the tail from a boundary before the end, not the whole text


def test_a_tokenizer_that_is_not_local_falls_back_to_whole(monkeypatch):
    tokenizer = build_tokenizer()
    cached = PrefixTokenizer(tokenizer)
    first = "abc " * 400
    cached.encode(first)
    real = cached._encode

    def prefixing(t):  # a tokenizer that adds a piece at the start of every text (a dummy prefix)
        ids, ends = real(t)
        return [7] + ids, type(ends)("q", [0]) + ends
    monkeypatch.setattr(cached, "_encode", prefixing)
    longer = first + "the end"
    assert cached.encode(longer)[0] == 7  # whole: the check refused the stitched tokens
    assert cached.encode(longer)[1:] == tokenizer.encode(longer, add_special_tokens=False)


@pytest.mark.parametrize("a,b,n", [("", "", 0), ("abc", "abd", 2), ("abc", "abc", 3), ("ab", "abc", 2), ("x", "y", 0)])
def test_shared_prefix(a, b, n):
    assert shared_prefix(a, b) == n


def test_what_it_holds_is_bounded(monkeypatch):
    from daemon.engine import tokencache

    monkeypatch.setattr(tokencache, "MAX_HELD_TOKENS", 1000)
    cached = PrefixTokenizer(build_tokenizer(), capacity=4)
    rng = random.Random(3)
    for _ in range(10):
        cached.encode(text(rng, 300, False))
    assert len(cached._recent) <= 4 and (len(cached._recent) == 1 or
                                          sum(len(e.ids) for e in cached._recent.values()) <= 1000)
