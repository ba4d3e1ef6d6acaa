"""The loaded-model cache: the sole owner of runtimes.

`acquire(model, num_ctx, keep_alive)` is an async context manager giving a leased runtime:
the model loads on first use (off the event loop, one load at a time; concurrent requests
for the same model share the load), a refcount keeps it while leases are out, and the
keep_alive timer starts when it goes idle. keep_alive 0 unloads after the last lease,
"forever" never expires, and a request without keep_alive keeps the current value.

num_ctx: a request that needs a larger context than the loaded runtime has (its own num_ctx,
or the default when it sets none) reloads the model once it is idle; while others use it, the request is served within the loaded
context (its prompt truncated to fit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from daemon.config import Settings
from daemon.durations import FOREVER_NS
from daemon.registry.catalog import ResolvedModel

log = logging.getLogger(__name__)


class Runtime(Protocol):
    num_ctx: int  # the context it was loaded with
    default_num_ctx: int  # what a load without an explicit num_ctx would choose

    @property
    def size_bytes(self) -> int: ...

    @property
    def size_vram(self) -> int: ...

    def close(self) -> None: ...


Loader = Callable[[ResolvedModel, "int | None"], Runtime]


@dataclass
class Resident:
    resolved: ResolvedModel
    runtime: Runtime
    keep_alive_ns: int
    refcount: int = 0
    expires_at: float | None = None  # wall-clock seconds; None while in use or forever
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None

    @property
    def expires_at_wall(self) -> float:
        """What /api/ps reports: the expiry, or now + keep_alive while in use."""
        if self.keep_alive_ns >= FOREVER_NS:
            return time.time() + FOREVER_NS / 1e9
        if self.expires_at is not None:
            return self.expires_at
        return time.time() + self.keep_alive_ns / 1e9


class ModelCache:
    def __init__(self, settings: Settings, loader: Loader) -> None:
        self._settings = settings
        self._loader = loader
        self._residents: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Task[Runtime]] = {}
        self._load_lock = asyncio.Lock()

    @property
    def max_loaded(self) -> int:
        return self._settings.max_loaded_models or 3

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    @contextlib.asynccontextmanager
    async def acquire(self, resolved: ResolvedModel, num_ctx: int | None,
                      keep_alive_ns: int | None) -> AsyncIterator[Runtime]:
        resident = await self._get(resolved, num_ctx, keep_alive_ns)
        resident.refcount += 1
        if resident.timer is not None:
            resident.timer.cancel()
            resident.timer = None
        resident.expires_at = None
        try:
            yield resident.runtime
        finally:
            resident.refcount -= 1
            resident.last_used = time.monotonic()
            if resident.refcount == 0:
                self._start_expiry(resident)

    async def _get(self, resolved: ResolvedModel, num_ctx: int | None, keep_alive_ns: int | None) -> Resident:
        key = resolved.digest
        resident = self._residents.get(key)
        wanted = num_ctx or (resident.runtime.default_num_ctx if resident else 0)
        if resolved.context_length:
            wanted = min(wanted, resolved.context_length)  # contexts are capped at the trained one
        if resident is not None and wanted > resident.runtime.num_ctx and resident.refcount == 0:
            log.info("reloading %s for num_ctx %d (loaded with %d)", resolved.name.display, wanted,
                     resident.runtime.num_ctx)
            await self._unload(resident)
            resident = None
        if resident is None:
            runtime = await self._load(resolved, num_ctx)
            resident = self._residents.get(key)
            if resident is None:
                resident = Resident(resolved, runtime, keep_alive_ns if keep_alive_ns is not None
                                    else self._settings.keep_alive_ns)
                self._residents[key] = resident
                await self._evict_beyond_limit(keep=resident)
        if keep_alive_ns is not None:
            resident.keep_alive_ns = keep_alive_ns
        return resident

    async def _load(self, resolved: ResolvedModel, num_ctx: int | None) -> Runtime:
        key = resolved.digest
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load_one(resolved, num_ctx))
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        # shield: a waiter whose client goes away does not abort a load others may share
        return await asyncio.shield(task)

    async def _load_one(self, resolved: ResolvedModel, num_ctx: int | None) -> Runtime:
        async with self._load_lock:
            existing = self._residents.get(resolved.digest)
            if existing is not None:
                return existing.runtime
            return await asyncio.to_thread(self._loader, resolved, num_ctx)

    async def _evict_beyond_limit(self, keep: Resident) -> None:
        while len(self._residents) > self.max_loaded:
            idle = [r for r in self._residents.values() if r.refcount == 0 and r is not keep]
            if not idle:
                return
            await self._unload(min(idle, key=lambda r: r.last_used))

    def _start_expiry(self, resident: Resident) -> None:
        ns = resident.keep_alive_ns
        if ns >= FOREVER_NS:
            return
        if ns <= 0:
            asyncio.ensure_future(self._unload_if_idle(resident))
            return
        resident.expires_at = time.time() + ns / 1e9
        loop = asyncio.get_running_loop()
        resident.timer = loop.call_later(ns / 1e9, lambda: asyncio.ensure_future(self._unload_if_idle(resident)))

    async def _unload_if_idle(self, resident: Resident) -> None:
        if resident.refcount == 0 and self._residents.get(resident.resolved.digest) is resident:
            await self._unload(resident)

    async def _unload(self, resident: Resident) -> None:
        if self._residents.get(resident.resolved.digest) is resident:
            del self._residents[resident.resolved.digest]
        if resident.timer is not None:
            resident.timer.cancel()
        log.info("unloading %s", resident.resolved.name.display)
        await asyncio.to_thread(resident.runtime.close)

    async def unload(self, resolved: ResolvedModel) -> None:
        """Expire a model now (keep_alive 0 with an empty prompt); in use: after its requests."""
        resident = self._residents.get(resolved.digest)
        if resident is None:
            return
        resident.keep_alive_ns = 0
        if resident.refcount == 0:
            await self._unload(resident)

    async def close(self) -> None:
        for resident in list(self._residents.values()):
            await self._unload(resident)
        for task in list(self._loading.values()):
            with contextlib.suppress(Exception):
                runtime = await task
                await asyncio.to_thread(runtime.close)
