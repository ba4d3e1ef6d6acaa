"""Prometheus metrics: `GET /metrics` in the text format, from a registry of this app's own
(no global one: two apps in one process, as in the tests, count apart).

Events are counted as they happen (requests, tokens, loads, unloads, pulls); what is a
state (the queue, sequences, KV slots, loaded models, memory) is read from the scheduler at
scrape time, so that it cannot drift. Names follow Prometheus' conventions, as vLLM's and
llama.cpp's servers do for the same quantities: an `hfollama_` prefix, base units
(`_seconds`, `_bytes`) and `_total` on counters. Model labels are the names models resolve
to (bounded by the store), never what a client typed.
"""

from __future__ import annotations

import sys
from typing import Any, AsyncIterator, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from daemon.scheduler.scheduler import Scheduler

# seconds: 5 ms to 2 minutes (a cold load's first token sits in the top buckets)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
RATE_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hfollama_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("hfollama_request_duration_seconds", "HTTP request duration, to its last byte",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("hfollama_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("hfollama_time_per_output_token_seconds",
                                   "A generation's decode time per token after the first (one observation per request)",
                                   ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.rate = Histogram("hfollama_generation_tokens_per_second", "A generation's decode rate",
                              ["model"], buckets=RATE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hfollama_prompt_tokens", "Prompt tokens, evaluated or taken from the prefix cache",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("hfollama_prompt_tokens_cached", "Prompt tokens taken from the prefix cache",
                                     ["model"], registry=r)
        self.prefix_lookups = Counter("hfollama_prefix_cache_requests", "Generations by whether the prefix cache had "
                                      "part of their prompt", ["model", "result"], registry=r)
        self.generated = Counter("hfollama_generation_tokens", "Generated tokens", ["model"], registry=r)
        self.queue_wait = Histogram("hfollama_queue_wait_seconds", "Time a request waited in the scheduler's queue "
                                    "for its model (loads included)", buckets=LATENCY_BUCKETS, registry=r)
        self.loads = Counter("hfollama_model_loads", "Model loads by result", ["model", "result"], registry=r)
        self.load_seconds = Histogram("hfollama_model_load_duration_seconds", "Model load time", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.unloads = Counter("hfollama_model_unloads", "Models unloaded, by reason (expired, evicted, requested, "
                               "reload, shutdown)", ["model", "reason"], registry=r)
        self.pulls = Counter("hfollama_pulls", "Pulls by result", ["result"], registry=r)
        ProcessCollector(registry=r)

    def bind(self, scheduler: Scheduler, store: Any) -> None:
        """Read the scheduler's and store's state at every scrape."""
        self.registry.register(_StateCollector(scheduler, store))

    # ---- events -------------------------------------------------------------------------

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def generation_done(self, model: str, ttft: float | None, prompt: int, cached: int, generated: int,
                        eval_seconds: float) -> None:
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        self.prompt_tokens.labels(model).inc(prompt)
        self.cached_tokens.labels(model).inc(cached)
        self.prefix_lookups.labels(model, "hit" if cached else "miss").inc()
        self.generated.labels(model).inc(generated)
        if generated > 1 and eval_seconds > 0:
            self.per_token.labels(model).observe(eval_seconds / (generated - 1))
            self.rate.labels(model).observe((generated - 1) / eval_seconds)

    # the scheduler's events (scheduler.SchedulerEvents)
    def waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def loaded(self, model: str, seconds: float, ok: bool) -> None:
        self.loads.labels(model, "success" if ok else "failure").inc()
        if ok:
            self.load_seconds.labels(model).observe(seconds)

    def unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()

    async def counted_pull(self, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """A pull's progress as it is, counted as a success when it ends with "success"."""
        ok = False
        try:
            async for event in events:
                ok = ok or event.get("status") == "success"
                yield event
        finally:
            self.pulls.labels("success" if ok else "failure").inc()

    # ---- the route ----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _StateCollector:
    def __init__(self, scheduler: Scheduler, store: Any) -> None:
        self._scheduler = scheduler
        self._store = store

    def describe(self) -> list[Metric]:
        return []  # collected lazily: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self._scheduler
        yield GaugeMetricFamily("hfollama_queue_depth", "Requests waiting in the scheduler's queue for a model",
                                value=s.queue_depth)
        yield GaugeMetricFamily("hfollama_memory_budget_bytes", "Memory the scheduler may fill with models",
                                value=s.budget.capacity)
        loaded = GaugeMetricFamily("hfollama_model_loaded", "1 for each loaded model", labels=["model", "device"])
        memory = GaugeMetricFamily("hfollama_model_memory_bytes", "What each loaded model holds (weights, KV cache)",
                                   labels=["model", "device"])
        running = GaugeMetricFamily("hfollama_sequences_running", "Sequences prefilling or decoding", labels=["model"])
        waiting = GaugeMetricFamily("hfollama_sequences_waiting", "Sequences waiting for a slot", labels=["model"])
        slots = GaugeMetricFamily("hfollama_kv_slots", "KV cache slots (sequences decoded together)", labels=["model"])
        cached = GaugeMetricFamily("hfollama_kv_cached_tokens", "Tokens the prefix cache holds in free slots",
                                   labels=["model"])
        refs = GaugeMetricFamily("hfollama_model_requests_active", "Requests holding each model", labels=["model"])
        for resident in s.residents():
            model, runtime = resident.resolved.name.display, resident.runtime
            device = str(getattr(getattr(runtime, "loaded", None), "device", "cpu"))
            loaded.add_metric([model, device], 1)
            memory.add_metric([model, device], runtime.size_bytes)
            refs.add_metric([model], resident.refcount)
            runner = getattr(runtime, "runner", None)
            if runner is not None:
                running.add_metric([model], runner.running)
                waiting.add_metric([model], runner.waiting)
                slots.add_metric([model], runner.num_slots)
                cached.add_metric([model], runner.cached_tokens)
        yield from (loaded, memory, refs, running, waiting, slots, cached)
        yield from _gpu_memory()
        yield CounterMetricFamily("hfollama_pull_bytes", "Bytes pulls fetched over the network",
                                  value=self._store.bytes_fetched)


def _gpu_memory() -> Iterator[Metric]:
    """Each GPU's used and total memory, when this process uses CUDA (torch is not imported
    for a scrape: it is slow to import and a CPU-only daemon may never need it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    used = GaugeMetricFamily("hfollama_gpu_memory_used_bytes", "GPU memory in use (all processes)", labels=["device"])
    total = GaugeMetricFamily("hfollama_gpu_memory_total_bytes", "GPU memory", labels=["device"])
    allocated = GaugeMetricFamily("hfollama_gpu_memory_allocated_bytes", "GPU memory this daemon's tensors hold",
                                  labels=["device"])
    for index in range(torch.cuda.device_count()):
        free, whole = torch.cuda.mem_get_info(index)
        used.add_metric([f"cuda:{index}"], whole - free)
        total.add_metric([f"cuda:{index}"], whole)
        allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
    yield from (used, total, allocated)
