"""API keys: with HFOLLAMA_API_KEYS set, every route but `GET /` and `HEAD /` (the liveness
probe clients and load balancers use) and CORS preflights needs `Authorization: Bearer <key>`,
which the ollama (Python and JS, from OLLAMA_API_KEY) and openai clients send; `x-api-key`
is taken too. Ollama itself has no keys.

A presented key is hashed and compared with every key's hash in constant time, without
stopping at a match, and a missing key is compared the same way: the answer takes as long
whichever way it fails. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Callable

from aiohttp import web

from daemon.config import BindAddress
from daemon.errors import Unauthorized
from daemon.server.middleware import Handler

log = logging.getLogger(__name__)

OPEN_ROOT = ("GET", "HEAD")
NATIVE_MESSAGE = "unauthorized"  # what ollama.com's API answers
OPENAI_MESSAGE = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyCheck:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, presented: str | None) -> bool:
        candidate = _digest(presented or "")
        matched = False
        for digest in self._digests:  # every key, always: no early exit on a match
            matched |= hmac.compare_digest(candidate, digest)
        return matched and presented is not None


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def is_page(request: web.Request) -> bool:
    """The chat page's static files (no data in them: it asks for a key when the API wants one)."""
    return request.method in OPEN_ROOT and (request.path == "/ui" or request.path.startswith("/ui/"))


def auth_middleware(check: KeyCheck, metrics_keyed: bool) -> Callable:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        exempt = (request.method == "OPTIONS" or (request.path == "/" and request.method in OPEN_ROOT)
                  or (request.path == "/metrics" and not metrics_keyed) or is_page(request))
        if check.enabled and not exempt and not check.allows(presented_key(request)):
            raise Unauthorized(OPENAI_MESSAGE if request.path.startswith("/v1/") else NATIVE_MESSAGE)
        return await handler(request)

    return auth


def warn_if_open(bind: BindAddress, check: KeyCheck) -> None:
    if not bind.is_loopback and not check.enabled:
        log.warning("listening on %s with no API keys: anyone who can reach this address can use and change the "
                    "models; set HFOLLAMA_API_KEYS (or --api-key) to require a key", bind.host)
