"""The prefix cache: the slot policy (engine/prefix.py) as a table, then the runner reusing,
copying and waiting for prefixes on a tiny model against the cache off, then the acceptance on
the real SmolLM2 through the daemon."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from daemon.engine.prefix import (FOLLOW_MIN_TOKENS, PROBE_TOKENS, Holder, Reuse, SlotCache, common_prefix,
                                  common_prefixes)
from test_runner import collect, make_runner, req


@pytest.mark.parametrize("a, b, n", [
    ([], [], 0), ([1], [], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 5, 3], 1),
    ([9, 2], [1, 2], 0), (list(range(1000)), list(range(999)) + [5], 999), (list(range(1000)), list(range(1000)), 1000),
    ((1, 2, 3, 4), [1, 2, 3, 9], 3),
])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n


def test_common_prefixes_with_many_as_with_each():
    """The vectorized probe of the first PROBE_TOKENS, then full compares where it agrees."""
    long = list(range(3, 3 + 3 * PROBE_TOKENS))
    cut = lambda n, tail=(): long[:n] + list(tail)  # noqa: E731
    others = [[], [3], cut(PROBE_TOKENS - 1), cut(PROBE_TOKENS), cut(PROBE_TOKENS + 1), long, long + [1],
              cut(10, [0]), cut(PROBE_TOKENS, [0]), cut(2 * PROBE_TOKENS, [0]), [0] + long, (3, 4, 5)]
    for prompt in (long, cut(5), cut(PROBE_TOKENS), cut(PROBE_TOKENS + 7, [2, 2])):
        assert common_prefixes(prompt, others) == [common_prefix(prompt, o) for o in others]
    assert common_prefixes(long, []) == []


OWNER = object()
PROMPT = list(range(100, 200))  # 100 tokens


def cache_holding(held: dict[int, list[int]], used_order: list[int], slots: int = 4, enabled=True) -> SlotCache:
    cache = SlotCache(slots, enabled)
    for slot in used_order:  # oldest first
        cache.keep(slot, held.get(slot, []))
    return cache


@pytest.mark.parametrize("held, order, free, busy, expected", [
    # nothing cached: the least recently used free slot (never used counts as oldest)
    ({}, [0, 1], [0, 1, 2], [], Reuse(2)),
    ({}, [2, 0, 1], [0, 1, 2], [], Reuse(2)),
    # the previous turn of this conversation in a free slot: that slot, no copy
    ({1: PROMPT[:60]}, [1], [0, 1, 2], [], Reuse(1, 60, 1)),
    # the same prompt again: all but its last token, whose logits are the first sample
    ({1: PROMPT}, [1], [0, 1], [], Reuse(1, 99, 1)),
    ({1: PROMPT + [7, 8]}, [1], [0, 1], [], Reuse(1, 99, 1)),
    # a free slot sharing a short head of a long conversation: copied, its conversation kept
    ({1: PROMPT[:10] + list(range(50))}, [1], [0, 1], [], Reuse(0, 10, 1)),
    # the longest of several
    ({0: PROMPT[:20], 1: PROMPT[:70]}, [0, 1], [0, 1, 2], [], Reuse(1, 70, 1)),
    # a running sequence's tokens: copied from its slot into the least recently used free one
    ({}, [], [0, 1], [Holder(3, PROMPT[:80] + [1], 81, OWNER)], Reuse(0, 80, 3)),
    # a prompt still being prefilled that will hold more: wait for it
    ({}, [], [0, 1], [Holder(3, PROMPT[:90] + [5, 5], 10, OWNER)], Reuse(0, 90, 3, leader=OWNER)),
    # ... unless what it would save over what is there now is small
    ({1: PROMPT[:85]}, [1], [0, 1], [Holder(3, PROMPT[:90] + [5], 10, OWNER)], Reuse(1, 85, 1)),
])
def test_plan(held, order, free, busy, expected):
    assert cache_holding(held, order).plan(PROMPT, free, busy) == expected


def test_plan_off_and_what_kept_and_taken_slots_hold():
    cache = cache_holding({1: PROMPT}, [1], enabled=False)
    assert cache.plan(PROMPT, [0, 1], [Holder(3, PROMPT, 100, OWNER)]) == Reuse(0)
    assert cache.cached_tokens() == 0
    cache = cache_holding({1: PROMPT, 2: [1, 2]}, [1, 2])
    assert cache.cached_tokens() == 102
    cache.take(1)
    assert cache.held(1) == [] and cache.cached_tokens() == 2
    assert FOLLOW_MIN_TOKENS > 1


# ---- the runner on a tiny model -----------------------------------------------------------

def run(runner, *requests):
    async def main():
        return await asyncio.gather(*(collect(runner, r) for r in requests))
    return asyncio.run(main())


@pytest.fixture(scope="module")
def runners(tiny_dirs):
    on, off = make_runner(tiny_dirs["random"], slots=2, chunk=8), make_runner(tiny_dirs["random"], slots=2, chunk=8,
                                                                              prefix_cache=False)
    yield on, off
    on.close()
    off.close()


def counting(runner):
    """Record each pass's prompt chunks (token ids, slot, start) and decode rows."""
    original, passes = runner.model.forward_mixed, []

    def forward_mixed(tokens, slots, starts, chunks):
        passes.append([list(c) for c in chunks])
        return original(tokens, slots, starts, chunks)

    runner.model.forward_mixed = forward_mixed
    return passes, lambda: setattr(runner.model, "forward_mixed", original)


def test_a_conversation_prefills_only_its_new_tokens_and_answers_as_without_the_cache(runners):
    on, off = runners
    history: list[int] = [1, 2, 3, 4, 5]
    for turn in range(5):
        prompt = history + [30 + turn, 31 + turn, 32]
        (cached_text, cached), = run(on, req(prompt, n=6))
        (plain_text, plain), = run(off, req(prompt, n=6))
        assert cached.output_ids == plain.output_ids and cached_text == plain_text
        assert plain.prompt_eval_count == len(prompt)
        if turn:  # the previous prompt and its answer (but the last token) are cached
            assert cached.prompt_eval_count == len(prompt) - (len(history) - 1)
        history = list(cached.output_ids)
    (_, again), = run(on, req(history, n=3))
    assert again.prompt_eval_count == 1  # the same tokens again: only the last one is evaluated


def test_concurrent_prompts_sharing_a_prefix_compute_it_once(runners, tiny_dirs):
    on, off = runners
    shared = [random.Random(1).randrange(3, 200) for _ in range(40)]
    a, b = shared + [7, 8, 9], shared + [10, 11]
    expected = [run(off, req(p, n=5))[0][0] for p in (a, b)]
    passes, restore = counting(on)
    try:
        results = run(on, req(a, n=5), req(b, n=5))
    finally:
        restore()
    assert [t for t, _ in results] == expected
    computed = [tok for chunks in passes for ids, _, _ in chunks for tok in ids]
    assert len(computed) == len(a) + 2  # the shared 40 once, then b's own two
    assert sorted(f.prompt_eval_count for _, f in results) == [2, len(a)]


def test_prompts_following_one_leader_copy_its_prefix_together(runners, tiny_dirs):
    _, off = runners
    shared = [random.Random(2).randrange(3, 200) for _ in range(40)]
    prompts = [shared + [7 + i, 8 + i] for i in range(4)]
    expected = [run(off, req(p, n=4))[0][0] for p in prompts]
    runner = make_runner(tiny_dirs["random"], slots=4, chunk=8)
    copies, original = [], runner.model.copy_prefix
    runner.model.copy_prefix = lambda source, targets, length: (copies.append((source, sorted(targets), length)),
                                                                original(source, targets, length))
    try:
        results = run(runner, *(req(p, n=4) for p in prompts))
    finally:
        runner.close()
    assert [t for t, _ in results] == expected
    assert len(copies) == 1 and len(copies[0][1]) == 3  # the three followers, in one copy
    assert sorted(f.prompt_eval_count for _, f in results) == [2, 2, 2, len(prompts[0])]


def test_a_prompt_whose_copy_is_still_to_run_leads_one_admitted_beside_it(runners, tiny_dirs):
    """A copies the start of its prompt from a free slot and computes the rest; B, admitted in
    the same round and sharing all of A's prompt, waits for A instead of computing it too."""
    import threading

    _, off = runners
    shared = [random.Random(3).randrange(3, 200) for _ in range(60)]
    a, b = shared + [7, 8], shared + [9]
    expected = [run(off, req(p, n=2))[0][0] for p in (a, b)]
    runner = make_runner(tiny_dirs["random"], slots=4, chunk=8)
    run(runner, req(shared[:10] + [250] * 30, n=1))  # a free slot holding A's first 10 tokens
    passes, restore = counting(runner)
    gate = threading.Event()

    async def main():  # the loop thread waits in a task while A and B arrive: one admission
        blocker = asyncio.ensure_future(runner.run_exclusive(gate.wait))
        await asyncio.sleep(0.05)
        both = [asyncio.ensure_future(collect(runner, r)) for r in (req(a, n=2), req(b, n=2))]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        return await asyncio.gather(*both)
    try:
        results = asyncio.run(main())
    finally:
        restore()
        runner.close()
    assert [t for t, _ in results] == expected
    assert [f.prompt_eval_count for _, f in results] == [len(a) - 10, 1]


def test_eviction_under_slot_pressure_keeps_every_answer_right(runners):
    """Four conversations over two slots, in random order, one or two at a time: the cache keeps
    what fits (least recently used out first), some turns find their history and some do not,
    and every answer equals the one without a cache."""
    on, off = runners
    rng = random.Random(5)
    histories = {c: [rng.randrange(3, 200) for _ in range(rng.randrange(5, 20))] for c in range(4)}
    hits = misses = 0
    for _ in range(14):
        pair = rng.sample(list(histories), rng.choice([1, 1, 2]))
        prompts = [histories[c] + [rng.randrange(3, 200)] for c in pair]
        cached = run(on, *(req(p, n=4) for p in prompts))
        plain = run(off, *(req(p, n=4) for p in prompts))
        assert [f.output_ids for _, f in cached] == [f.output_ids for _, f in plain]
        for c, p, (_, f) in zip(pair, prompts, cached):
            hits += f.prompt_eval_count < len(p)
            misses += f.prompt_eval_count == len(p)
            histories[c] = list(f.output_ids)
    assert hits and misses
    assert on.cached_tokens <= 2 * 256  # two slots of the context at most


def test_a_request_cancelled_mid_prefill_leaves_what_it_computed_and_nothing_else(runners):
    on, off = runners
    prompt = [random.Random(2).randrange(3, 200) for _ in range(60)]
    (expected, _), = run(off, req(prompt, n=6))
    original = on.model.forward_mixed
    passes = []

    def slow(tokens, slots, starts, chunks):
        passes.append(len(chunks))
        time.sleep(0.05)
        return original(tokens, slots, starts, chunks)

    async def cancel_after_three_passes():
        stream = on.generate(req(prompt, n=6))
        task = asyncio.ensure_future(stream.__anext__())
        while len(passes) < 3:
            await asyncio.sleep(0.01)
        task.cancel()  # what a client disconnect does to its handler
        with pytest.raises(asyncio.CancelledError):
            await task

    on.model.forward_mixed = slow
    try:
        asyncio.run(cancel_after_three_passes())
        while on.busy:
            time.sleep(0.01)
    finally:
        on.model.forward_mixed = original
    done = len(passes) * 8
    assert 0 < done < len(prompt)
    (text, final), = run(on, req(prompt, n=6))
    assert text == expected and final.prompt_eval_count == len(prompt) - done


def test_a_failed_prefill_leaves_nothing_behind(runners):
    on, off = runners
    prompt = [random.Random(3).randrange(3, 200) for _ in range(30)]
    (expected, _), = run(off, req(prompt, n=6))
    original, calls = on.model.forward_mixed, []

    def failing(tokens, slots, starts, chunks):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in the third pass")
        return original(tokens, slots, starts, chunks)

    on.model.forward_mixed = failing
    try:
        with pytest.raises(Exception, match="boom"):
            run(on, req(prompt, n=6))
    finally:
        on.model.forward_mixed = original
    (text, final), = run(on, req(prompt, n=6))
    assert text == expected and final.prompt_eval_count == len(prompt)


# ---- the real SmolLM2 through the daemon: the cache on (the session daemon) and off ------------

SMOL = "smollm2:135m"


@pytest.fixture(scope="module")
def uncached(daemon, tmp_path_factory, tiny_dirs):
    """The same store and model with the prefix cache off."""
    from conftest import make_settings, run_daemon

    settings = make_settings(tmp_path_factory.mktemp("uncached"), tiny_dirs, models_dir=daemon.settings.models_dir,
                             prefix_cache=False)
    yield from run_daemon(settings)


def chat(url: str, messages: list[dict], **options) -> dict:
    r = httpx.post(url + "/api/chat", timeout=600, json={
        "model": SMOL, "stream": False, "messages": messages, "options": {"temperature": 0, **options}})
    assert r.status_code == 200, r.text
    return r.json()


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocabulary = "river stone light garden paper window music silver forest quiet morning engine".split()
    return " ".join(rng.choice(vocabulary) for _ in range(n))


QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a river in Germany.", "What is 3 + 4?",
             "Say hello in Spanish.", "Thank you. Goodbye."]


@pytest.mark.slow
def test_smollm2_six_turns_the_same_with_and_without_the_cache_each_turn_only_its_new_tokens(daemon, uncached):
    system = {"role": "system", "content": "You are a helpful assistant. " + words(time.time_ns(), 60)}
    on, off = [system], [system]
    previous = None
    for turn, question in enumerate(QUESTIONS):
        on.append({"role": "user", "content": question})
        off.append({"role": "user", "content": question})
        cached, plain = chat(daemon.url, on, num_predict=16), chat(uncached.url, off, num_predict=16)
        assert cached["message"]["content"] == plain["message"]["content"]
        if previous is not None:
            # what the previous turn fed (its prompt and answer but the answer's last token) is
            # cached; the answer's text tokenizes back to the tokens it was generated as
            assert cached["prompt_eval_count"] == (plain["prompt_eval_count"] - previous["prompt_eval_count"]
                                                   - previous["eval_count"] + 1)
        else:  # the shared daemon may hold the default system prompt from an earlier test
            assert cached["prompt_eval_count"] <= plain["prompt_eval_count"]
        previous = plain
        on.append(cached["message"])
        off.append(plain["message"])
    assert "Paris" in on[2]["content"]


@pytest.mark.slow
def test_smollm2_two_concurrent_requests_sharing_500_tokens_compute_them_once(daemon, uncached):
    document = {"role": "system", "content": "Read this. " + words(time.time_ns() + 1, 480)}
    questions = [[document, {"role": "user", "content": q}] for q in ("What is the first word?", "Summarize it.")]
    expected = [chat(uncached.url, m, num_predict=8) for m in questions]
    assert expected[0]["prompt_eval_count"] > 500
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda m: chat(daemon.url, m, num_predict=8), questions))
    assert [r["message"]["content"] for r in results] == [e["message"]["content"] for e in expected]
    # whichever comes first computes its prompt (but the template's first tokens, which an
    # earlier conversation may have left cached); the other waits for the shared part and
    # evaluates only its own question
    follower, leader = sorted(r["prompt_eval_count"] for r in results)
    assert follower < 30 and leader > 480
    assert follower + leader < sum(e["prompt_eval_count"] for e in expected) - 450


@pytest.mark.slow
def test_smollm2_eviction_and_a_cancelled_prefill_keep_every_answer_right(daemon, uncached):
    """More conversations than the daemon's four slots, round robin (each one's history evicted
    before it comes back, or not), and a long prompt cancelled while it prefills: every
    answer equals the uncached daemon's."""
    conversations = [[{"role": "system", "content": words(time.time_ns() + c, 30)}] for c in range(6)]
    for turn in range(2):
        for c, messages in enumerate(conversations):
            messages.append({"role": "user", "content": QUESTIONS[(c + turn) % len(QUESTIONS)]})
            cached, plain = chat(daemon.url, messages, num_predict=6), chat(uncached.url, messages, num_predict=6)
            assert cached["message"]["content"] == plain["message"]["content"]
            messages.append(plain["message"])

    long = [{"role": "user", "content": words(time.time_ns() + 99, 1500) + " What is the first word?"}]
    with httpx.stream("POST", daemon.url + "/api/chat", timeout=600,
                      json={"model": SMOL, "messages": long, "options": {"temperature": 0, "num_predict": 6}}):
        time.sleep(0.6)  # the client leaves while its 2,000 tokens are being prefilled
    (resident,) = [r for r in daemon.services.models.residents() if r.resolved.name.model == "smollm2"]
    deadline = time.time() + 30
    while resident.runtime.runner.busy and time.time() < deadline:
        time.sleep(0.05)
    again, plain = chat(daemon.url, long, num_predict=6), chat(uncached.url, long, num_predict=6)
    assert again["message"]["content"] == plain["message"]["content"]
    assert again["prompt_eval_count"] <= plain["prompt_eval_count"]
