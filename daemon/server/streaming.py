"""The one streaming helper: a stream of wire objects becomes NDJSON lines or one object.

Errors before the first byte are real HTTP errors (the first event is pulled before the
status line goes out); after it, one final `{"error": ...}` line ends the stream. A client
that disconnects closes the event source, which cancels the generation behind it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from daemon.errors import DaemonError, message_of
from daemon.server.wire import dumps, json_response

log = logging.getLogger(__name__)

Reducer = Callable[[list[dict[str, Any]]], dict[str, Any]]


def last_object(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1] if events else {}


async def respond(request: web.Request, events: AsyncIterator[dict[str, Any]], *, stream: bool,
                  reduce: Reducer = last_object) -> web.StreamResponse:
    async with contextlib.aclosing(events):
        if not stream:
            return json_response(reduce([event async for event in events]))
        first = await anext(events, None)  # errors here become an HTTP error status
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            if first is not None:
                await response.write((dumps(first) + "\n").encode())
            async for event in events:
                await response.write((dumps(event) + "\n").encode())
        except (ConnectionResetError, ConnectionError):
            log.debug("client went away mid-stream")
            return response
        except DaemonError as exc:
            await response.write((dumps({"error": message_of(exc)}) + "\n").encode())
        except Exception as exc:  # after the first byte the status is sent: report in-band
            log.exception("stream failed")
            await response.write((dumps({"error": message_of(exc)}) + "\n").encode())
        await response.write_eof()
        return response
