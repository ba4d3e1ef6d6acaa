"""Typed application state (aiohttp AppKeys instead of globals)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from daemon.config import Settings
from daemon.registry.catalog import Catalog
from daemon.scheduler.scheduler import Scheduler
from daemon.server.metrics import Metrics
from daemon.store.store import Store


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    store: Store
    models: Scheduler
    metrics: Metrics


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]
