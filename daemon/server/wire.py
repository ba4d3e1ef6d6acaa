"""Small helpers for Ollama's wire formats: timestamps and JSON bodies."""

from __future__ import annotations

import datetime
import json
from typing import Any

from aiohttp import web


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


def native_error(message: str, status: int) -> dict:
    return {"error": message}


def openai_error(message: str, status: int) -> dict:
    """OpenAI's error object, as Ollama's /v1 layer sends it."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


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
