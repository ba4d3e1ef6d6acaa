"""The one streaming helper: a stream of wire objects becomes NDJSON lines (the native API),
server-sent events (/v1), or one object.

Errors before the first byte are real HTTP errors (the first event is pulled before the
status line goes out); after it, one final `{"error": ...}` line ends the stream. A client
that disconnects closes the event source, which cancels the generation behind it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from daemon.errors import DaemonError, message_of, status_of
from daemon.server.wire import dumps, json_response, native_error, openai_error

log = logging.getLogger(__name__)

Reducer = Callable[[list[dict[str, Any]]], dict[str, Any]]


def last_object(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1] if events else {}


@dataclass(frozen=True)
class Framing:
    content_type: str
    prefix: str
    suffix: str
    end: str  # written after the last event
    error: Callable[[str, int], dict[str, Any]]  # the in-band error event

    def encode(self, obj: dict[str, Any]) -> bytes:
        return (self.prefix + dumps(obj) + self.suffix).encode()

    def error_event(self, exc: BaseException) -> bytes:
        return self.encode(self.error(message_of(exc), status_of(exc)))


NDJSON = Framing("application/x-ndjson", "", "\n", "", native_error)
SSE = Framing("text/event-stream", "data: ", "\n\n", "data: [DONE]\n\n", openai_error)


async def respond(request: web.Request, events: AsyncIterator[dict[str, Any]], *, stream: bool,
                  reduce: Reducer = last_object, framing: Framing = NDJSON) -> web.StreamResponse:
    async with contextlib.aclosing(events):
        if not stream:
            return json_response(reduce([event async for event in events]))
        first = await anext(events, None)  # errors here become an HTTP error status
        response = web.StreamResponse(status=200, headers={"Content-Type": framing.content_type})
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(framing.encode(first))
            async for event in events:
                await response.write(framing.encode(event))
        except (ConnectionResetError, ConnectionError):
            log.debug("client went away mid-stream")
            return response
        except DaemonError as exc:
            await response.write(framing.error_event(exc))
        except Exception as exc:  # after the first byte the status is sent: report in-band
            log.exception("stream failed")
            await response.write(framing.error_event(exc))
        if framing.end:
            await response.write(framing.end.encode())
        await response.write_eof()
        return response
