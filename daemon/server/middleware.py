"""Middleware: the error map, CORS (Ollama's allow-list plus OLLAMA_ORIGINS), the Host
check while bound to loopback, and Ollama's plain-text 404 / 405."""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from aiohttp import web

from daemon.config import BindAddress
from daemon.errors import DaemonError, Unauthorized, message_of, status_of
from daemon.server.wire import error_response, native_error, openai_error

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOWED_HEADERS = (
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
    "x-stainless-arch", "x-stainless-async", "x-stainless-custom-poll-interval", "x-stainless-helper-method",
    "x-stainless-lang", "x-stainless-os", "x-stainless-package-version", "x-stainless-poll-helper",
    "x-stainless-retry-count", "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-timeout",
)
ALLOWED_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
DEFAULT_ORIGINS = tuple(
    f"{scheme}://{host}{port}"
    for scheme in ("http", "https") for host in ("localhost", "127.0.0.1", "0.0.0.0") for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


def _error(request: web.Request, message: str, status: int) -> web.Response:
    """Ollama's `{"error": "..."}`, or OpenAI's error object under /v1."""
    return error_response(message, status, openai_error if request.path.startswith("/v1/") else native_error)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DaemonError as exc:
        response = _error(request, message_of(exc), status_of(exc))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="hfollama"'
        return response
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed")
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _error(request, message_of(exc), 500)


class OriginPolicy:
    def __init__(self, extra: tuple[str, ...]) -> None:
        self.allow_all = "*" in extra
        self.patterns = tuple(o for o in extra if o != "*") + DEFAULT_ORIGINS

    def allows(self, origin: str) -> bool:
        return self.allow_all or any(fnmatch.fnmatchcase(origin, p) for p in self.patterns)


def same_origin_by_address(request: web.Request, origin: str) -> bool:
    """A page this daemon served, opened at an IP address (the chat page at
    http://192.168.1.5:11434/ui): its Origin is the request's own Host. Only for IP literals,
    which DNS rebinding cannot forge; a host name must be in the allow-list."""
    host = request.headers.get("Host", "")
    if not host or origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower()):
        return False
    try:
        ipaddress.ip_address(host_name(host))
    except ValueError:
        return False
    return True


def cors_middleware(policy: OriginPolicy) -> Callable:
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        if not policy.allows(origin) and not same_origin_by_address(request, origin):
            return web.Response(status=403)  # gin-contrib/cors answers with an empty body
        allow_origin = "*" if policy.allow_all else origin
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allow_origin,
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ",".join(ALLOWED_HEADERS),
                "Access-Control-Max-Age": "43200",
                "Vary": "Origin",
            })
        response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = allow_origin
        response.headers["Vary"] = "Origin"
        return response

    return cors


def host_name(host: str) -> str:
    """A Host header without its port: `[::1]:11434` -> `::1`, `example:80` -> `example`."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _allowed_host(host: str) -> bool:
    host = host.lower()
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    if any(host.endswith(tld) for tld in (".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def host_check_middleware(bind: BindAddress) -> Callable:
    """DNS-rebinding guard, only while bound to loopback (as Ollama)."""

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not bind.is_loopback:
            return await handler(request)
        if not _allowed_host(host_name(request.headers.get("Host", ""))):
            return web.Response(status=403)
        if request.method == "OPTIONS" and "Origin" not in request.headers:
            return web.Response(status=204)
        return await handler(request)

    return host_check
