"""The scheduler: the sole owner of loaded models.

`acquire(model, num_ctx, keep_alive)` is an async context manager that leases a loaded
runtime. A model already loaded is leased at once, whatever else is happening. Otherwise
the request joins a FIFO queue (beyond OLLAMA_MAX_QUEUE: 503 with Ollama's text) that one
worker serves one load at a time, off the event loop:

- the footprint is estimated first; a model larger than the whole budget fails at once
  with the need and the budget in the message, and nothing is unloaded for it;
- idle models are unloaded until it fits (policy.choose_victims: shortest keep_alive first,
  then least recently used); models in use are never unloaded: the load waits for a release;
- after the load the measured footprint replaces the estimate;
- a failed load (out of memory included) frees what it allocated and fails that request
  only; every other model keeps serving.

keep_alive follows Ollama: the timer starts when the last lease goes; 0 unloads then,
"forever" never expires, and a request without keep_alive keeps the current value.

num_ctx: a request needing a larger context than the loaded runtime has (its num_ctx, or
the default when it sets none) reloads the model once it is idle; while others use it, the
request is served within the loaded context (its prompt truncated to fit).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from daemon.config import Settings
from daemon.durations import FOREVER_NS
from daemon.errors import SERVER_BUSY_MESSAGE, ModelTooLarge, ServerBusy
from daemon.registry.catalog import ResolvedModel
from daemon.scheduler.policy import MemoryBudget, choose_victims, human_bytes

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
Estimator = Callable[[ResolvedModel, "int | None"], int]


class SchedulerEvents(Protocol):
    """What the scheduler reports as it happens (the metrics count it)."""

    def waited(self, seconds: float) -> None: ...  # a request's time in the queue, its load included

    def loaded(self, model: str, seconds: float, ok: bool) -> None: ...

    def unloaded(self, model: str, reason: str) -> None: ...  # expired, evicted, requested, reload, shutdown


class NoEvents:
    def waited(self, seconds: float) -> None:
        pass

    def loaded(self, model: str, seconds: float, ok: bool) -> None:
        pass

    def unloaded(self, model: str, reason: str) -> None:
        pass


@dataclass
class Resident:
    resolved: ResolvedModel
    runtime: Runtime
    keep_alive_ns: int
    refcount: int = 0
    expires_at: float | None = None  # wall-clock seconds, while idle with a finite keep_alive
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None

    @property
    def size_bytes(self) -> int:
        return self.runtime.size_bytes

    @property
    def expires_at_wall(self) -> float:
        """What /api/ps reports: the expiry, or now + keep_alive while in use."""
        if self.keep_alive_ns >= FOREVER_NS:
            return time.time() + FOREVER_NS / 1e9
        if self.expires_at is not None:
            return self.expires_at
        return time.time() + self.keep_alive_ns / 1e9


@dataclass
class _Pending:
    resolved: ResolvedModel
    num_ctx: int | None
    keep_alive_ns: int | None
    future: asyncio.Future
    abandoned: bool = False


class Scheduler:
    def __init__(self, settings: Settings, loader: Loader, budget: MemoryBudget, estimate: Estimator,
                 events: SchedulerEvents | None = None) -> None:
        self._settings = settings
        self._events = events or NoEvents()
        self._loader = loader
        self.budget = budget
        self._estimate = estimate
        self._residents: dict[str, Resident] = {}
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._loading: _Pending | None = None  # the request whose model is loading: no longer queued

    @property
    def max_loaded(self) -> int:
        return self._settings.max_loaded_models or 3

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a model to load (the one loading now included)."""
        return sum(1 for p in self._pending if not p.abandoned)

    @property
    def used_bytes(self) -> int:
        return sum(r.size_bytes for r in self._residents.values())

    # ---- leases -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def acquire(self, resolved: ResolvedModel, num_ctx: int | None,
                      keep_alive_ns: int | None) -> AsyncIterator[Runtime]:
        resident = self._usable(resolved, num_ctx)
        if resident is not None:
            self._reserve(resident)
        else:
            queued = time.perf_counter()
            resident = await self._wait_for_load(resolved, num_ctx, keep_alive_ns)  # reserved by the worker
            self._events.waited(time.perf_counter() - queued)
        if keep_alive_ns is not None:
            resident.keep_alive_ns = keep_alive_ns
        resident.resolved = resolved  # names of one model (a copy, an alias): /api/ps shows the last used
        try:
            yield resident.runtime
        finally:
            self._release(resident)

    def _wanted_ctx(self, resolved: ResolvedModel, num_ctx: int | None, resident: Resident) -> int:
        wanted = num_ctx or resident.runtime.default_num_ctx
        return min(wanted, resolved.context_length) if resolved.context_length else wanted

    def _usable(self, resolved: ResolvedModel, num_ctx: int | None) -> Resident | None:
        resident = self._residents.get(resolved.digest)
        if resident is None:
            return None
        if self._wanted_ctx(resolved, num_ctx, resident) > resident.runtime.num_ctx and resident.refcount == 0:
            return None  # needs a reload with a larger context: through the queue
        return resident

    def _reserve(self, resident: Resident) -> None:
        resident.refcount += 1
        if resident.timer is not None:
            resident.timer.cancel()
            resident.timer = None
        resident.expires_at = None

    def _release(self, resident: Resident) -> None:
        resident.refcount -= 1
        resident.last_used = time.monotonic()
        if resident.refcount == 0:
            self._start_expiry(resident)
            self._kick()

    # ---- the queue ----------------------------------------------------------------------

    def _kick(self) -> None:
        if self._closing:
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())

    async def _wait_for_load(self, resolved: ResolvedModel, num_ctx: int | None,
                             keep_alive_ns: int | None) -> Resident:
        waiting = sum(1 for p in self._pending if not p.abandoned and p is not self._loading)
        if waiting >= self._settings.max_queue:
            raise ServerBusy(SERVER_BUSY_MESSAGE)
        pending = _Pending(resolved, num_ctx, keep_alive_ns, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._kick()
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            pending.abandoned = True  # not loaded for a client that is gone, unless already under way

            def give_back(future: asyncio.Future) -> None:
                if not future.cancelled() and future.exception() is None:
                    self._release(future.result())
            pending.future.add_done_callback(give_back)
            raise

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            pending = self._pending[0]
            if pending.abandoned and not pending.future.done():
                self._pending.popleft()
                pending.future.cancel()
                continue
            if await self._serve(pending):
                self._pending.popleft()
            else:  # waiting for a busy model to be released
                self._wake.clear()
                await self._wake.wait()

    async def _serve(self, pending: _Pending) -> bool:
        """Handle the head of the queue; False when it must wait for a release."""
        resolved = pending.resolved
        resident = self._usable(resolved, pending.num_ctx)
        if resident is not None:
            self._reserve(resident)
            pending.future.set_result(resident)
            return True
        try:
            need = self._estimate(resolved, pending.num_ctx)
        except Exception as exc:
            pending.future.set_exception(exc)
            return True
        if need > self.budget.capacity:
            pending.future.set_exception(ModelTooLarge(
                f"model {resolved.name.display} needs about {human_bytes(need)} but the memory budget is "
                f"{human_bytes(self.budget.capacity)} ({self.budget.source}); nothing was unloaded for it"))
            return True
        stale = self._residents.get(resolved.digest)  # loaded with too small a context, and idle
        if stale is not None:
            await self._unload(stale, "reload")
        victims = choose_victims(list(self._residents.values()), need, self.budget.capacity, self.max_loaded)
        if victims is None:
            return False
        for victim in victims:
            log.info("unloading %s to make room for %s", victim.resolved.name.display, resolved.name.display)
            await self._unload(victim, "evicted")
        self._loading = pending
        started = time.perf_counter()
        try:
            runtime = await in_own_thread(self._loader, resolved, pending.num_ctx)
        except Exception as exc:
            log.error("loading %s failed: %s", resolved.name.display, exc)
            self._events.loaded(resolved.name.display, time.perf_counter() - started, False)
            pending.future.set_exception(exc)
            return True
        finally:
            self._loading = None
        self._events.loaded(resolved.name.display, time.perf_counter() - started, True)
        keep_alive = pending.keep_alive_ns if pending.keep_alive_ns is not None else self._settings.keep_alive_ns
        resident = Resident(resolved, runtime, keep_alive)
        self._residents[resolved.digest] = resident
        log.info("%s loaded: %s measured, %s estimated; %s of %s in use", resolved.name.display,
                 human_bytes(runtime.size_bytes), human_bytes(need), human_bytes(self.used_bytes),
                 human_bytes(self.budget.capacity))
        self._reserve(resident)
        await self._settle()  # room made before the request runs (the new model is reserved: kept)
        pending.future.set_result(resident)
        if pending.abandoned:  # loaded for a client that left meanwhile: idle now
            self._release(resident)
        return True

    async def _settle(self) -> None:
        """When a measured footprint came out above its estimate, unload idle models until
        the residents fit the budget again."""
        if self.used_bytes <= self.budget.capacity:
            return
        victims = choose_victims(list(self._residents.values()), 0, self.budget.capacity, self.max_loaded + 1) or []
        for victim in victims:
            log.info("unloading %s: the measured footprints exceed the budget", victim.resolved.name.display)
            await self._unload(victim, "evicted")

    # ---- expiry and unloading -----------------------------------------------------------

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
            await self._unload(resident, "expired")

    async def _unload(self, resident: Resident, reason: str) -> None:
        if self._residents.get(resident.resolved.digest) is resident:
            del self._residents[resident.resolved.digest]
            self._events.unloaded(resident.resolved.name.display, reason)
        if resident.timer is not None:
            resident.timer.cancel()
        log.info("unloading %s", resident.resolved.name.display)
        await asyncio.to_thread(resident.runtime.close)
        self._kick()

    def relabel(self, resolved: ResolvedModel) -> None:
        """Show a loaded model under another of its names (the one it had was deleted)."""
        resident = self._residents.get(resolved.digest)
        if resident is not None:
            resident.resolved = resolved

    async def unload(self, resolved: ResolvedModel) -> None:
        """Expire a model now (keep_alive 0 with an empty prompt; delete). In use: when the
        last request using it ends."""
        resident = self._residents.get(resolved.digest)
        if resident is None:
            return
        resident.keep_alive_ns = 0
        if resident.refcount == 0:
            await self._unload(resident, "requested")

    async def close(self) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.cancel()
        for pending in self._pending:
            if not pending.future.done():
                pending.future.cancel()
        for resident in list(self._residents.values()):
            await self._unload(resident, "shutdown")
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker


async def in_own_thread(fn: Callable, *args: object) -> object:
    """fn(*args) in a thread of its own that ends with it (not the event loop's executor, whose
    threads live on). On the CPU, torch's OpenMP gives every thread that ran a parallel region
    a pool of workers that lasts as long as that thread, and while more workers exist than
    cores, libgomp's workers sleep between regions instead of spinning: a load in a long-lived
    thread left its pool behind and slowed every later decode step of the runner's thread by
    half (SmolLM2 on two cores: 45 against 65 tokens/s, bench/README.md)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():  # running now: a cancel can no longer race the result
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            future.set_exception(exc)

    threading.Thread(target=run, name=f"load:{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return await asyncio.wrap_future(future)
