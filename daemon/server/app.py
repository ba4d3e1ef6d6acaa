"""The application factory: what `serve` runs and what the tests drive."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import AsyncIterator, Callable

from aiohttp import web

from daemon import OLLAMA_API_VERSION
from daemon.config import Settings
from daemon.registry.catalog import Catalog
from daemon.registry.registry import Registry, shipped_modelfiles_dir
from daemon.scheduler.policy import MemoryBudget
from daemon.scheduler.scheduler import Estimator, Loader, Scheduler
from daemon.server.access import access_middleware
from daemon.server.auth import KeyCheck, auth_middleware, warn_if_open
from daemon.server.handlers import embed, inference, manage, meta, models, openai, ui
from daemon.server.metrics import Metrics
from daemon.server.middleware import OriginPolicy, cors_middleware, error_middleware, host_check_middleware
from daemon.server.state import SERVICES, Services
from daemon.server.wire import MAX_JSON_BODY
from daemon.store.store import Store

log = logging.getLogger(__name__)


def default_loader(settings: Settings) -> Loader:
    def load(resolved, num_ctx):  # imported lazily: torch is slow to import
        from daemon.backends.runtime import load_runtime

        return load_runtime(resolved, settings, num_ctx)

    return load


def default_estimator(settings: Settings) -> Estimator:
    def estimate(resolved, num_ctx):
        from daemon.backends.runtime import estimate_footprint

        return estimate_footprint(resolved, settings, num_ctx)

    return estimate


def default_budget(settings: Settings) -> MemoryBudget:
    from daemon.backends.transformers_backend import pick_device

    device = pick_device(settings.device)
    budget = MemoryBudget.detect(device.type, settings.gpu_memory, device.index or 0)
    log.info("memory budget for models: %.1f GiB on %s (%s)", budget.capacity / (1 << 30), budget.device,
             budget.source)
    return budget


def build_catalog(settings: Settings, store: Store | None = None) -> Catalog:
    registry = Registry([shipped_modelfiles_dir(), settings.modelfiles_dir])
    return Catalog(registry, store)


def build_store(settings: Settings) -> Store:
    return Store(settings.models_dir, hf_token=settings.hf_token, hf_endpoint=settings.hf_endpoint)


def create_app(settings: Settings, *, catalog: Catalog | None = None, loader: Loader | None = None,
               budget: MemoryBudget | None = None, estimator: Estimator | None = None) -> web.Application:
    metrics = Metrics()
    keys = KeyCheck(settings.api_keys)
    app = web.Application(
        middlewares=[
            access_middleware(metrics),  # outermost: it sees every final status and the whole duration
            web.normalize_path_middleware(remove_slash=True, append_slash=False),
            cors_middleware(OriginPolicy(settings.origins)),  # outside the error map: errors get CORS headers
            host_check_middleware(settings.bind),
            error_middleware,
            auth_middleware(keys, settings.metrics_auth),
        ],
        client_max_size=MAX_JSON_BODY,  # JSON bodies; blobs stream past it
    )
    store = build_store(settings)
    catalog = catalog or build_catalog(settings, store)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        scheduler = Scheduler(settings, loader or default_loader(settings), budget or default_budget(settings),
                              estimator or default_estimator(settings), events=metrics)
        metrics.bind(scheduler, store)
        app[SERVICES] = Services(settings=settings, catalog=catalog, store=store, models=scheduler, metrics=metrics)
        yield
        await scheduler.close()

    app.cleanup_ctx.append(lifecycle)
    meta.add_routes(app)
    models.add_routes(app)
    inference.add_routes(app)
    manage.add_routes(app)
    embed.add_routes(app)
    openai.add_routes(app)
    ui.add_routes(app)
    app.router.add_get("/metrics", metrics.handle)
    return app


# The runner threads wait for the GIL after every decode step while the event loop serves
# HTTP; with Python's default 5 ms switch interval a busy event loop could leave the GPU idle
# for that long between steps. A prompt pass gives the GIL up at each Triton launch (about
# 130 for Llama-3-8B) and waits up to this long for it each time while the loop takes in a
# burst of requests: at 0.5 ms its 2,048-token pass took 100 ms instead of 51 on the H200.
GIL_SWITCH_SECONDS = 0.0001


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the bound port (port 0 picks a free one).
    Handlers are cancelled when their client disconnects, which stops generation."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock)
    await site.start()
    return runner, sock.getsockname()[1]


async def serve_forever(settings: Settings, on_ready: Callable[[int], None] | None = None) -> None:
    app = create_app(settings)
    runner, port = await start_server(app, settings.bind.host, settings.bind.port)
    warn_if_open(settings.bind, KeyCheck(settings.api_keys))
    log.info("Listening on %s:%d (hfollama, Ollama API %s)", settings.bind.host, port, OLLAMA_API_VERSION)
    page_host = "127.0.0.1" if settings.bind.host in ("0.0.0.0", "::", "") else settings.bind.host
    log.info("Chat page: http://%s:%d/ui", f"[{page_host}]" if ":" in page_host else page_host, port)
    if on_ready:
        on_ready(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
