"""The streaming helper: errors before the first byte are HTTP errors, after it an error line."""

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.errors import BadRequest, NotFound
from daemon.server.middleware import error_middleware
from daemon.server.streaming import respond


async def events(fail_at: int | None, error=BadRequest("bad thing")):
    for i in range(3):
        if i == fail_at:
            raise error
        yield {"i": i}


def app_for(fail_at, stream, error=BadRequest("bad thing")):
    async def handler(request):
        return await respond(request, events(fail_at, error), stream=stream, reduce=lambda ev: {"n": len(ev)})
    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/", handler)
    return app


async def fetch(app):
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/")
        return r.status, r.headers["Content-Type"], await r.text()


@pytest.mark.parametrize("stream", [True, False])
async def test_success(stream):
    status, ctype, text = await fetch(app_for(None, stream))
    assert status == 200
    if stream:
        assert ctype == "application/x-ndjson" and [json.loads(x) for x in text.splitlines()] == [
            {"i": 0}, {"i": 1}, {"i": 2}]
        assert text.endswith("\n") and "\n\n" not in text
    else:
        assert ctype.startswith("application/json") and json.loads(text) == {"n": 3}


@pytest.mark.parametrize("stream", [True, False])
async def test_error_before_first_byte_is_an_http_error(stream):
    status, _, text = await fetch(app_for(0, stream, NotFound("model 'x' not found")))
    assert status == 404 and json.loads(text) == {"error": "model 'x' not found"}


async def test_error_mid_stream_is_a_final_error_line():
    status, _, text = await fetch(app_for(2, True))
    lines = [json.loads(x) for x in text.splitlines()]
    assert status == 200 and lines == [{"i": 0}, {"i": 1}, {"error": "bad thing"}]


async def test_unexpected_exception_mid_stream_is_reported_in_band():
    status, _, text = await fetch(app_for(1, True, RuntimeError("kaput")))
    assert status == 200 and json.loads(text.splitlines()[-1]) == {"error": "kaput"}
