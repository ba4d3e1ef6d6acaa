"""The scheduler's policy with models of declared sizes: no weights, just lifecycles."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from daemon.config import Settings
from daemon.durations import FOREVER_NS
from daemon.errors import ModelTooLarge, ServerBusy
from daemon.names import ModelName
from daemon.scheduler.policy import MemoryBudget
from daemon.scheduler.scheduler import Scheduler

GB = 10**9


@dataclass
class FakeRuntime:
    num_ctx: int
    size_bytes: int
    default_num_ctx: int = 2048
    closed: bool = False
    size_vram: int = 0

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeModel:
    digest: str
    size: int = GB
    context_length: int = 8192
    name: ModelName = field(init=False)

    def __post_init__(self):
        self.name = ModelName.parse(self.digest)


class Loader:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.loads: list[tuple[str, int | None]] = []

    def __call__(self, model, num_ctx):
        time.sleep(self.delay)
        self.loads.append((model.digest, num_ctx))
        return FakeRuntime(num_ctx or 2048, model.size)


def make(capacity=10 * GB, delay=0.0, **settings):
    loader = Loader(delay)
    sched = Scheduler(Settings.from_env({}, **settings), loader, MemoryBudget(capacity, "test", "test"),
                      lambda model, num_ctx: model.size)
    return sched, loader


def run(coro):
    return asyncio.run(coro)


async def use(sched, model, hold=0.0, keep_alive=None, num_ctx=None):
    async with sched.acquire(model, num_ctx, keep_alive) as rt:
        await asyncio.sleep(hold)
        return rt


def loaded(sched):
    return sorted(r.resolved.digest for r in sched.residents())


def test_hit_after_load_and_concurrent_requests_share_one_load():
    async def main():
        sched, loader = make(delay=0.05)
        m = FakeModel("a")
        runtimes = await asyncio.gather(*(use(sched, m, 0.01) for _ in range(5)))
        assert len({id(r) for r in runtimes}) == 1 and loader.loads == [("a", None)]
        assert await use(sched, m) is runtimes[0] and len(loader.loads) == 1  # a hit
        await sched.close()
    run(main())


def test_idle_models_are_evicted_to_fit():
    async def main():
        sched, loader = make(capacity=5 * GB)
        a, b, c = FakeModel("a", 2 * GB), FakeModel("b", 2 * GB), FakeModel("c", 2 * GB)
        ra = await use(sched, a)
        await use(sched, b)
        await use(sched, c)
        assert ra.closed and loaded(sched) == ["b", "c"]
        await sched.close()
    run(main())


def test_a_model_in_use_is_never_evicted_the_load_waits():
    async def main():
        sched, _ = make(capacity=5 * GB)
        a, b = FakeModel("a", 3 * GB), FakeModel("b", 3 * GB)
        holder = asyncio.ensure_future(use(sched, a, hold=0.3))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        rb = await use(sched, b)
        ra = await holder
        assert time.monotonic() - started >= 0.2  # b waited for a's release
        assert ra.closed and not rb.closed and loaded(sched) == ["b"]
        await sched.close()
    run(main())


def test_shortest_keep_alive_goes_first_then_least_recently_used():
    async def main():
        sched, _ = make(capacity=6 * GB)
        long, short, older = FakeModel("long", 2 * GB), FakeModel("short", 2 * GB), FakeModel("older", 2 * GB)
        await use(sched, older, keep_alive=600 * 10**9)
        await use(sched, long, keep_alive=3600 * 10**9)
        await use(sched, short, keep_alive=60 * 10**9)
        await use(sched, FakeModel("new1", 2 * GB))
        assert loaded(sched) == ["long", "new1", "older"]  # short keep_alive went first
        await use(sched, older, keep_alive=3600 * 10**9)  # now older and long tie: long is less recent
        await use(sched, FakeModel("new2", 2 * GB), keep_alive=3600 * 10**9)
        assert "new1" not in loaded(sched)  # the default 5m keep_alive is the shortest
        await use(sched, FakeModel("new3", 2 * GB))
        assert loaded(sched) == ["new2", "new3", "older"]  # among equals, the least recently used went
        await sched.close()
    run(main())


def test_max_loaded_models_caps_residents():
    async def main():
        sched, _ = make(capacity=100 * GB, max_loaded_models=2)
        for name in "abc":
            await use(sched, FakeModel(name))
        assert loaded(sched) == ["b", "c"]
        await sched.close()
    run(main())


def test_expiry_starts_when_idle_and_a_new_request_stops_it():
    async def main():
        sched, _ = make()
        m = FakeModel("a")
        rt = await use(sched, m, hold=0.15, keep_alive=int(0.1e9))
        assert not rt.closed and sched.residents()[0].expires_at is not None  # in use, no expiry
        await use(sched, m)  # without keep_alive: keeps the last explicit one
        assert sched.residents()[0].keep_alive_ns == int(0.1e9)
        await asyncio.sleep(0.25)
        assert rt.closed and sched.residents() == []
        await sched.close()
    run(main())


def test_keep_alive_zero_forever_and_explicit_unload():
    async def main():
        sched, _ = make()
        rt = await use(sched, FakeModel("zero"), keep_alive=0)
        await asyncio.sleep(0.05)
        assert rt.closed
        forever = FakeModel("forever")
        rt = await use(sched, forever, keep_alive=FOREVER_NS)
        await asyncio.sleep(0.05)
        assert not rt.closed and sched.residents()[0].expires_at_wall > time.time() + 100 * 365 * 86400
        await sched.unload(forever)
        assert rt.closed
        await sched.close()
    run(main())


def test_queue_full_is_503():
    async def main():
        sched, _ = make(delay=0.3, max_queue=1)
        first = asyncio.ensure_future(use(sched, FakeModel("a")))  # being loaded
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(use(sched, FakeModel("b")))  # queued
        await asyncio.sleep(0.05)
        with pytest.raises(ServerBusy) as err:
            await use(sched, FakeModel("c"))
        assert err.value.message == "server busy, please try again.  maximum pending requests exceeded"
        await asyncio.gather(first, second)
        assert await use(sched, FakeModel("a")) is not None  # a loaded model needs no queue
        await sched.close()
    run(main())


def test_too_large_fails_with_need_and_budget_and_evicts_nothing():
    async def main():
        sched, loader = make(capacity=5 * GB)
        await use(sched, FakeModel("small", 2 * GB))
        with pytest.raises(ModelTooLarge) as err:
            await use(sched, FakeModel("huge", 6 * GB))
        assert "needs about 5.6 GiB" in err.value.message and "budget is 4.7 GiB" in err.value.message
        assert loaded(sched) == ["small"] and [d for d, _ in loader.loads] == ["small"]
        await sched.close()
    run(main())


def test_three_models_under_a_budget_for_two_all_complete():
    async def main():
        sched, loader = make(capacity=4 * GB, delay=0.01)
        models = [FakeModel(n, 2 * GB) for n in "abc"]

        async def client(i):
            for j in range(6):
                await use(sched, models[(i + j) % 3], hold=0.005)
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(9))), timeout=30)
        assert len(sched.residents()) <= 2 and sched.used_bytes <= 4 * GB
        await sched.close()
    run(main())


def test_a_failed_load_fails_only_its_request():
    async def main():
        def loader(model, num_ctx):
            if model.digest == "bad":
                raise RuntimeError("CUDA out of memory")
            return FakeRuntime(num_ctx or 2048, model.size)
        sched = Scheduler(Settings.from_env({}), loader, MemoryBudget(10 * GB, "t", "t"), lambda m, n: m.size)
        good = await use(sched, FakeModel("good"))
        with pytest.raises(RuntimeError, match="out of memory"):
            await use(sched, FakeModel("bad"))
        assert not good.closed and loaded(sched) == ["good"]
        assert await use(sched, FakeModel("good")) is good
        await sched.close()
    run(main())


def test_each_load_runs_in_a_thread_of_its_own_that_ends_with_it():
    """Not in the event loop's executor, whose threads outlive the load: a thread that ran
    torch's parallel ops keeps an OpenMP pool, which slows the runner's thread (in_own_thread)."""
    import threading

    async def main():
        threads = []

        def loader(model, num_ctx):
            threads.append(threading.current_thread())
            return FakeRuntime(num_ctx or 2048, model.size)
        sched = Scheduler(Settings.from_env({}), loader, MemoryBudget(10 * GB, "t", "t"), lambda m, n: m.size)
        await use(sched, FakeModel("a"))
        await use(sched, FakeModel("b"))
        assert len(threads) == 2 and threads[0] is not threads[1] and threading.main_thread() not in threads
        for t in threads:
            t.join(timeout=5)
            assert not t.is_alive()
        await sched.close()
    run(main())


def test_larger_num_ctx_reloads_when_idle_and_is_served_within_while_busy():
    async def main():
        sched, loader = make()
        m = FakeModel("a")
        async with sched.acquire(m, 1024, None) as first:
            async with sched.acquire(m, 4096, None) as same:
                assert same is first
        assert await use(sched, m, num_ctx=512) is first
        default = await use(sched, m)  # the default context (2048) needs more than 1024
        assert default is not first and first.closed
        await use(sched, m, num_ctx=100_000)  # capped at the trained context
        assert [n for _, n in loader.loads] == [1024, None, 100_000]
        await sched.close()
    run(main())


def test_a_client_that_leaves_while_queued_does_not_load():
    async def main():
        sched, loader = make(delay=0.2)
        busy = asyncio.ensure_future(use(sched, FakeModel("a")))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(use(sched, FakeModel("b")))
        await asyncio.sleep(0.05)
        gone.cancel()
        await busy
        await asyncio.sleep(0.3)
        assert [d for d, _ in loader.loads] == ["a"]
        await sched.close()
    run(main())


def test_a_footprint_above_its_estimate_makes_room_after_the_load():
    async def main():
        def loader(model, num_ctx):
            return FakeRuntime(num_ctx or 2048, model.size * 2)  # measured: twice the estimate
        sched = Scheduler(Settings.from_env({}), loader, MemoryBudget(10 * GB, "t", "t"), lambda m, n: m.size)
        a = await use(sched, FakeModel("a", 3 * GB))  # measures 6
        await use(sched, FakeModel("b", 3 * GB))  # estimate fits (6 + 3), measures 6: over budget
        assert a.closed and loaded(sched) == ["b"] and sched.used_bytes <= 10 * GB
        await sched.close()
    run(main())


class Recorder:
    """The scheduler's events, as the metrics receive them."""

    def __init__(self):
        self.events = []

    def waited(self, seconds):
        self.events.append(("waited",))

    def loaded(self, model, seconds, ok):
        self.events.append(("loaded", model, ok))

    def unloaded(self, model, reason):
        self.events.append(("unloaded", model, reason))


def test_events_name_each_load_and_why_each_model_went():
    recorder = Recorder()
    loader = Loader()
    sched = Scheduler(Settings.from_env({}, max_loaded_models=1), loader, MemoryBudget(10 * GB, "test", "test"),
                      lambda model, num_ctx: model.size, events=recorder)
    a, b = FakeModel("a"), FakeModel("b")

    async def main():
        await use(sched, a)
        await use(sched, b)  # one model at most: a is evicted
        await use(sched, b, num_ctx=4096)  # a larger context: b reloads
        await use(sched, a, keep_alive=0)  # b evicted, a expires at once
        await asyncio.sleep(0.05)
        await use(sched, b)
        await sched.unload(b)
        await use(sched, a)
        await sched.close()
    run(main())
    names = lambda m: str(ModelName.parse(m).display)  # noqa: E731
    assert [e for e in recorder.events if e[0] != "waited"] == [
        ("loaded", names("a"), True),
        ("unloaded", names("a"), "evicted"), ("loaded", names("b"), True),
        ("unloaded", names("b"), "reload"), ("loaded", names("b"), True),
        ("unloaded", names("b"), "evicted"), ("loaded", names("a"), True), ("unloaded", names("a"), "expired"),
        ("loaded", names("b"), True), ("unloaded", names("b"), "requested"),
        ("loaded", names("a"), True), ("unloaded", names("a"), "shutdown"),
    ]
    assert recorder.events.count(("waited",)) == 6


def test_a_failed_load_is_an_event_too():
    recorder = Recorder()

    def failing(model, num_ctx):
        raise RuntimeError("out of memory")
    sched = Scheduler(Settings.from_env({}), failing, MemoryBudget(10 * GB, "test", "test"), lambda m, c: m.size,
                      events=recorder)
    with pytest.raises(RuntimeError):
        run(use(sched, FakeModel("a")))
    assert ("loaded", str(ModelName.parse("a").display), False) in recorder.events
    assert sched.queue_depth == 0
