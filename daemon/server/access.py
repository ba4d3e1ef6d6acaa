"""The access log and the request metrics: one line per request, when its last byte is
written (or its client went away), with what the handlers noted in its `RequestRecord`:

    127.0.0.1 "POST /api/chat" 200 model=llama3:8b prompt_tokens=1012 cached_tokens=980
        generated_tokens=64 ttft_ms=21.4 duration_ms=702.3

or, with HFOLLAMA_LOG_FORMAT=json, the same fields as one JSON object (daemon/logs.py). No
prompt or output text is ever in it, nor any header (API keys travel in one). A client that
disconnects is logged with status 499, as nginx does. Passing scrapes and probes (`/metrics`,
`/`, `/api/version`) are logged at debug level only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from daemon.server.metrics import Metrics
from daemon.server.middleware import Handler

log = logging.getLogger("hfollama.access")

CLIENT_CLOSED = 499
QUIET_ROUTES = ("/", "/metrics", "/api/version")


@dataclass
class RequestRecord:
    """What a handler learned about its request, for the log line and the metrics."""

    started: float = field(default_factory=time.perf_counter)
    model: str | None = None  # the name it resolved to
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    eval_seconds: float = 0.0
    ttft: float | None = None  # seconds from arrival to the first token

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def generation(self, prompt: int, cached: int, generated: int, eval_seconds: float) -> None:
        self.prompt_tokens, self.cached_tokens, self.generated_tokens = prompt, cached, generated
        self.eval_seconds = eval_seconds


# a typed key where aiohttp has them (3.13 on), a plain one before
RECORD_KEY = web.RequestKey("record", RequestRecord) if hasattr(web, "RequestKey") else "hfollama.record"


def record_of(request: web.Request) -> RequestRecord:
    """The request's record (a fresh one where no access middleware runs, as in unit tests)."""
    record = request.get(RECORD_KEY)
    if record is None:
        record = request[RECORD_KEY] = RequestRecord()
    return record


def route_of(request: web.Request) -> str:
    """The route's pattern (bounded), not the path a client typed."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    return resource.canonical if resource is not None else "unmatched"


def access_fields(request: web.Request, route: str, status: int, record: RequestRecord,
                  seconds: float) -> dict[str, Any]:
    fields: dict[str, Any] = {"client": request.remote or "", "method": request.method, "path": request.path,
                              "route": route, "status": status}
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        fields["forwarded_for"] = forwarded[:200]
    if record.model is not None:
        fields["model"] = record.model
    for name in ("prompt_tokens", "cached_tokens", "generated_tokens"):
        value = getattr(record, name)
        if value is not None:
            fields[name] = value
    if record.ttft is not None:
        fields["ttft_ms"] = round(record.ttft * 1000, 1)
    fields["duration_ms"] = round(seconds * 1000, 1)
    return fields


def access_text(fields: dict[str, Any]) -> str:
    head = f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]}'
    rest = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("client", "method", "path", "route", "status"))
    return f"{head} {rest}"


def access_middleware(metrics: Metrics) -> Callable:
    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = request[RECORD_KEY] = RequestRecord()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.perf_counter() - record.started
            route = route_of(request)
            metrics.request_done(route, request.method, status, seconds)
            if record.model is not None and record.generated_tokens is not None:
                metrics.generation_done(record.model, record.ttft, record.prompt_tokens or 0,
                                        record.cached_tokens or 0, record.generated_tokens, record.eval_seconds)
            fields = access_fields(request, route, status, record, seconds)
            # scrapes and liveness probes come every few seconds: only in the debug log when they pass
            level = logging.DEBUG if route in QUIET_ROUTES and request.method in ("GET", "HEAD") and status < 400 \
                else logging.INFO
            log.log(level, access_text(fields), extra={"access": fields})

    return access
