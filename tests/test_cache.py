"""The loaded-model cache with a fake loader: no weights, just lifecycles."""

import asyncio
from dataclasses import dataclass, field

import pytest

from daemon.config import Settings
from daemon.durations import FOREVER_NS
from daemon.scheduler.cache import ModelCache


@dataclass
class FakeRuntime:
    num_ctx: int
    default_num_ctx: int = 2048
    closed: bool = False
    size_bytes: int = 100
    size_vram: int = 0

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeModel:
    digest: str
    context_length: int = 8192
    name: object = field(default=None)

    def __post_init__(self):
        from daemon.names import ModelName
        self.name = ModelName.parse(self.digest)


class Loader:
    def __init__(self):
        self.loads: list[tuple[str, int | None]] = []

    def __call__(self, model, num_ctx):
        self.loads.append((model.digest, num_ctx))
        return FakeRuntime(num_ctx or 2048)


def make(**settings):
    loader = Loader()
    return ModelCache(Settings.from_env({}, **settings), loader), loader


def run(coro):
    return asyncio.run(coro)


def test_loads_once_and_shares_concurrent_loads():
    async def main():
        cache, loader = make()
        m = FakeModel("a")

        async def use():
            async with cache.acquire(m, None, None) as rt:
                await asyncio.sleep(0.01)
                return rt
        runtimes = await asyncio.gather(*(use() for _ in range(5)))
        assert len({id(r) for r in runtimes}) == 1 and loader.loads == [("a", None)]
    run(main())


def test_keep_alive_zero_unloads_after_the_last_lease():
    async def main():
        cache, _ = make()
        m = FakeModel("a")
        async with cache.acquire(m, None, 0) as rt:
            async with cache.acquire(m, None, None):
                pass
            assert not rt.closed  # still leased
        await asyncio.sleep(0.05)
        assert rt.closed and cache.residents() == []
    run(main())


def test_expiry_starts_when_idle_and_a_new_request_stops_it():
    async def main():
        cache, _ = make()
        m = FakeModel("a")
        async with cache.acquire(m, None, int(0.1 * 1e9)) as rt:
            await asyncio.sleep(0.15)  # in use: no expiry
        assert not rt.closed and cache.residents()[0].expires_at is not None
        async with cache.acquire(m, None, None):  # keeps the last explicit keep_alive
            assert cache.residents()[0].keep_alive_ns == int(0.1 * 1e9)
        await asyncio.sleep(0.2)
        assert rt.closed
    run(main())


def test_forever_never_expires_and_explicit_unload_works():
    async def main():
        cache, _ = make()
        m = FakeModel("a")
        async with cache.acquire(m, None, FOREVER_NS) as rt:
            pass
        await asyncio.sleep(0.05)
        assert not rt.closed and cache.residents()[0].expires_at_wall > 1e10
        await cache.unload(m)
        assert rt.closed
    run(main())


def test_larger_num_ctx_reloads_when_idle():
    async def main():
        cache, loader = make()
        m = FakeModel("a")
        async with cache.acquire(m, 1024, None) as first:
            async with cache.acquire(m, 4096, None) as same:  # busy: served within the loaded context
                assert same is first
        async with cache.acquire(m, 512, None) as smaller:
            assert smaller is first
        async with cache.acquire(m, None, None) as default:  # the default (2048) needs more than 1024
            assert default is not first and first.closed
        async with cache.acquire(m, 100_000, None) as capped:  # capped at the trained context
            assert capped.num_ctx == 100_000 and loader.loads[-1] == ("a", 100_000)
        assert [n for _, n in loader.loads] == [1024, None, 100_000]
    run(main())


def test_evicts_least_recently_used_idle_beyond_the_limit():
    async def main():
        cache, _ = make(max_loaded_models=2)
        a, b, c = FakeModel("a"), FakeModel("b"), FakeModel("c")
        async with cache.acquire(a, None, None) as ra:
            pass
        async with cache.acquire(b, None, None) as rb:
            pass
        async with cache.acquire(c, None, None):
            pass
        assert ra.closed and not rb.closed
        assert sorted(r.resolved.digest for r in cache.residents()) == ["b", "c"]
        await cache.close()
        assert rb.closed
    run(main())


def test_a_failed_load_leaves_nothing_behind():
    async def main():
        def broken(model, num_ctx):
            raise RuntimeError("no memory")
        cache = ModelCache(Settings.from_env({}), broken)
        with pytest.raises(RuntimeError, match="no memory"):
            async with cache.acquire(FakeModel("a"), None, None):
                pass
        assert cache.residents() == []
    run(main())
