"""Small helpers for Ollama's wire formats: request bodies, timestamps and JSON bodies."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any, Callable, TypeVar

from aiohttp import web

from daemon.errors import PayloadTooLarge

T = TypeVar("T")

# The largest JSON request body (a long conversation with images fits many times over). It is
# aiohttp's client_max_size: `request.read()` stops there. Blobs stream and have no limit.
MAX_JSON_BODY = 256 << 20
# Bodies larger than this are decoded on a worker thread, so that parsing a 50 MB prompt does
# not hold up every other stream on the event loop.
THREADED_PARSE_BYTES = 1 << 20


async def read_request(request: web.Request, parse: Callable[[bytes], T]) -> T:
    """The request's body decoded into its typed request (`parse` is a from_body)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body too large: the limit is {MAX_JSON_BODY >> 20} MiB") from None
    if len(raw) > THREADED_PARSE_BYTES:
        return await asyncio.to_thread(parse, raw)
    return parse(raw)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


def native_error(message: str, status: int) -> dict:
    return {"error": message}


def openai_error(message: str, status: int) -> dict:
    """OpenAI's error object, as Ollama's /v1 layer sends it."""
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": "invalid_api_key" if status == 401 else None}}


def error_response(message: str, status: int, shape=native_error) -> web.Response:
    return json_response(shape(message, status), status)


def utc_now() -> str:
    """created_at: UTC RFC3339 with fractional seconds and Z."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def local_time(ts: float) -> str:
    """modified_at / expires_at: local zone with its offset, as Go's time.Time marshals."""
    try:
        value = datetime.datetime.fromtimestamp(ts).astimezone()
    except (OverflowError, OSError, ValueError):  # "forever": beyond what datetime holds
        value = datetime.datetime(2318, 1, 1, tzinfo=datetime.timezone.utc).astimezone()
    return value.isoformat().replace("+00:00", "Z")
