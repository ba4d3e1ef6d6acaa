"""The runner thread: batching, per-request options, cancellation, error isolation."""

import asyncio
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.engine.forward import ReferenceForward
from daemon.engine.params import GenerationRequest, SamplingParams
from daemon.engine.runner import Runner
from daemon.errors import InternalError
from tinymodels import SCRIPT_TEXT


def make_runner(path, slots=4, ctx=256, chunk=512, prefix_cache=True) -> Runner:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    forward = ReferenceForward(model, num_slots=slots, max_ctx=ctx, weight_dtype=torch.float32)
    return Runner(forward, tok, [tok.eos_token_id], prefill_chunk=chunk, prefix_cache=prefix_cache)


@pytest.fixture(scope="module")
def random_runner(tiny_dirs):
    r = make_runner(tiny_dirs["random"], chunk=4)
    yield r
    r.close()


async def collect(runner, request):
    text, final = "", None
    async for chunk in runner.generate(request):
        text += chunk.text
        if chunk.done:
            final = chunk
    return text, final


def req(prompt, n=12, **sampling):
    return GenerationRequest(tuple(prompt), SamplingParams(**{"temperature": 0.0, **sampling}), max_new_tokens=n)


def test_batched_greedy_equals_alone(random_runner):
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [9], [100, 101, 102, 103, 104]]
    alone = [asyncio.run(collect(random_runner, req(p)))[0] for p in prompts]
    together = asyncio.run(_gather(random_runner, [req(p) for p in prompts]))
    assert [t for t, _ in together] == alone


def test_seeded_sampling_equal_alone_and_batched(random_runner):
    p = req([3, 4, 5], n=16, temperature=1.3, top_k=0, top_p=1.0, seed=1234)
    alone = asyncio.run(collect(random_runner, p))[0]
    others = [req([7, 8], n=20, temperature=0.7, seed=1), req([9, 10, 11], n=5), req([12], n=30, top_k=3, seed=9)]
    together = asyncio.run(_gather(random_runner, [others[0], p, others[1], others[2]]))
    assert together[1][0] == alone


async def _gather(runner, requests):
    return await asyncio.gather(*(collect(runner, r) for r in requests))


def test_more_requests_than_slots_wait_in_order(random_runner):
    results = asyncio.run(_gather(random_runner, [req([i + 1, i + 2], n=6) for i in range(10)]))
    assert all(final.done_reason == "length" and final.eval_count == 6 for _, final in results)


def test_cancelled_request_frees_its_slot_and_others_finish(random_runner):
    async def main():
        long = random_runner.generate(req([1, 2, 3], n=200))
        first = await long.__anext__()
        assert isinstance(first.text, str)
        others = asyncio.gather(*(collect(random_runner, req([i, i + 1], n=20)) for i in range(3)))
        await long.aclose()  # what a client disconnect does
        return await others

    results = asyncio.run(main())
    assert all(f.eval_count == 20 for _, f in results)
    for _ in range(100):
        if random_runner.busy == 0:
            break
        import time
        time.sleep(0.01)
    assert random_runner.busy == 0


def test_eos_stop_and_metrics(tiny_dirs):
    runner = make_runner(tiny_dirs["scripted"])
    try:
        tok = AutoTokenizer.from_pretrained(tiny_dirs["scripted"])
        ids = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)["input_ids"]
        text, final = asyncio.run(collect(runner, GenerationRequest(tuple(ids), SamplingParams(temperature=0))))
        assert text == SCRIPT_TEXT and final.done_reason == "stop"
        assert final.prompt_eval_count == len(ids) and final.eval_count == 9
        assert final.output_ids[:len(ids)] == tuple(ids) and final.eval_duration_ns > 0
        stopped, final = asyncio.run(collect(runner, GenerationRequest(tuple(ids), SamplingParams(temperature=0),
                                                                       stop=("tail",))))
        assert stopped == "Hello world STOP " and final.done_reason == "stop"
    finally:
        runner.close()


def test_context_end_is_length(tiny_dirs):
    runner = make_runner(tiny_dirs["random"], ctx=16)
    try:
        _, final = asyncio.run(collect(runner, req([1] * 10, n=None)))
        assert final.done_reason == "length" and final.prompt_eval_count + final.eval_count == 16
        with pytest.raises(InternalError, match="does not fit"):
            asyncio.run(collect(runner, req([1] * 16)))
    finally:
        runner.close()


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(tiny_dirs):
    runner = make_runner(tiny_dirs["random"])
    original = runner.model.forward
    calls = {"n": 0}

    def flaky(tokens, slots, starts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(tokens, slots, starts)

    runner.model.forward = flaky
    try:
        with pytest.raises(InternalError, match="boom"):
            asyncio.run(collect(runner, req([1, 2], n=3)))
        _, final = asyncio.run(collect(runner, req([1, 2], n=3)))
        assert final.eval_count == 3
    finally:
        runner.close()


def test_close_fails_pending_requests(tiny_dirs):
    runner = make_runner(tiny_dirs["random"])
    runner.close()
    with pytest.raises(InternalError):
        asyncio.run(collect(runner, req([1, 2])))


def test_pipelined_steps_chain_on_the_device_and_match_step_by_step(tiny_dirs):
    """Requests that need nothing from the host per token launch each step before the host
    reads the previous one; asking for logprobs forces step-by-step decoding, and both give
    the same tokens (greedy, and seeded sampling)."""
    from dataclasses import replace

    runner = make_runner(tiny_dirs["random"])
    original = runner.model.forward
    chained = {"n": 0}

    def forward(tokens, slots, starts):
        if runner._inflight is not None:
            chained["n"] += 1
        return original(tokens, slots, starts)

    runner.model.forward = forward
    try:
        for request in (req([5, 6, 7], n=24), req([8, 9], n=24, temperature=0.9, top_k=20, seed=7)):
            chained["n"] = 0
            pipelined, final = asyncio.run(collect(runner, request))
            assert final.eval_count == 24 and chained["n"] >= 20
            chained["n"] = 0
            stepwise, final = asyncio.run(collect(runner, replace(request, logprobs=True)))
            assert final.eval_count == 24 and chained["n"] == 0
            assert pipelined == stepwise
    finally:
        runner.close()


def test_waiting_prompts_prefill_together_within_the_token_budget(tiny_dirs):
    """Prompts waiting together share a pass (within the budget), which also carries the
    running sequences' decode step; the tokens equal each request alone (the prefix cache off:
    the same prompts again would be cached)."""
    runner = make_runner(tiny_dirs["random"], chunk=8, prefix_cache=False)
    original = runner.model.forward_mixed
    passes = []

    def forward_mixed(tokens, slots, starts, chunks):
        passes.append([len(ids) for ids, _, _ in chunks])
        return original(tokens, slots, starts, chunks)

    runner.model.forward_mixed = forward_mixed
    try:
        prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16]]
        alone = []
        for p in prompts:
            alone.append(asyncio.run(collect(runner, req(p, n=6)))[0])
        passes.clear()

        async def arrive_together():  # all three wait while the loop thread is busy
            busy = asyncio.ensure_future(runner.run_exclusive(lambda: time.sleep(0.3)))
            await asyncio.sleep(0.05)
            results = await _gather(runner, [req(p, n=6) for p in prompts])
            await busy
            return results

        together = asyncio.run(arrive_together())
        assert [t for t, _ in together] == alone
        # 12 prompt tokens under a budget of 8: the first pass takes both short prompts and
        # the head of the third, the second pass its tail
        assert passes[:2] == [[3, 3, 2], [4]]
    finally:
        runner.close()


def test_a_failing_prefill_pass_fails_its_prompts_and_running_streams_go_on(tiny_dirs):
    runner = make_runner(tiny_dirs["random"])
    original = runner.model.forward_mixed
    state = {"armed": False}

    def forward_mixed(tokens, slots, starts, chunks):
        if state["armed"] and tokens.shape[0] > 0:  # a pass with running streams and a new prompt
            state["armed"] = False
            raise RuntimeError("prefill boom")
        return original(tokens, slots, starts, chunks)

    runner.model.forward_mixed = forward_mixed
    try:
        async def main():
            running = runner.generate(req([1, 2, 3], n=30))
            await running.__anext__()  # streaming
            state["armed"] = True
            with pytest.raises(InternalError, match="prefill boom"):
                await collect(runner, req([4, 5], n=5))
            rest = [c async for c in running]
            return rest[-1]

        final = asyncio.run(main())
        assert final.done and final.eval_count == 30
    finally:
        runner.close()


def test_an_exception_in_sampling_fails_its_step_frees_the_slot_and_the_next_request_is_served(tiny_dirs, monkeypatch):
    """Any exception in a step (here the sampler, as an overflowing top_k did) fails exactly
    that step's requests: each gets the error, its slot comes back within the step, the loop
    thread goes idle (no spinning) and the next request is served."""
    import daemon.engine.runner as runner_module

    runner = make_runner(tiny_dirs["random"], slots=2)
    real_sample = runner_module.sample

    def sample(logits, batch, steps, window=None):
        if bool((batch.top_k == 12345).any()):
            raise RuntimeError("Overflow when unpacking long")
        return real_sample(logits, batch, steps, window)

    monkeypatch.setattr(runner_module, "sample", sample)
    try:
        with pytest.raises(InternalError, match="Overflow"):
            asyncio.run(collect(runner, req([1, 2, 3], n=5, top_k=12345, temperature=0.5)))
        deadline = time.monotonic() + 2
        while runner.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.busy == 0 and sorted(runner._free_slots) == [0, 1]
        # a request arriving beside a failing one: both run in one step and both fail; the
        # loop serves the next ones
        async def both():
            return await asyncio.gather(collect(runner, req([4, 5], n=30, top_k=12345, temperature=0.5)),
                                        collect(runner, req([6, 7], n=4)), return_exceptions=True)
        results = asyncio.run(both())
        assert isinstance(results[0], InternalError)
        for _ in range(3):
            _, final = asyncio.run(collect(runner, req([1, 2], n=4)))
            assert final.eval_count == 4
        assert runner.busy == 0
    finally:
        runner.close()


def test_warm_up_serves_its_prompts_and_leaves_the_cache_empty(tiny_dirs):
    runner = make_runner(tiny_dirs["random"], slots=2)
    try:
        calls = []
        forward, forward_mixed = runner.model.forward, runner.model.forward_mixed
        runner.model.forward = lambda *a: calls.append("decode") or forward(*a)
        runner.model.forward_mixed = lambda *a: calls.append("prompt") or forward_mixed(*a)
        runner.warm_up([[5, 6, 7], list(range(40, 80))])
        assert "prompt" in calls and "decode" in calls  # both paths ran
        assert runner.cached_tokens == 0 and runner.busy == 0
        # nothing of it is reused: a request of the same prompt evaluates all of it
        _, final = asyncio.run(collect(runner, req(list(range(40, 80)), n=3)))
        assert final.prompt_eval_count == 40 and final.prompt_cached_count == 0
    finally:
        runner.close()
