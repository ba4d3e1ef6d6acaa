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


def error_response(message: str, status: int) -> web.Response:
    return json_response({"error": message}, status)


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
