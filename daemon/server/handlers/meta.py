"""Liveness and version: GET|HEAD /, GET|HEAD /api/version, GET /api/status."""

from __future__ import annotations

from aiohttp import web

from daemon import OLLAMA_API_VERSION
from daemon.server.wire import json_response


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_API_VERSION})


async def status(request: web.Request) -> web.Response:
    return json_response({"cloud": {"disabled": True, "source": "none"}})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # aiohttp adds HEAD for GET routes
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/status", status)
