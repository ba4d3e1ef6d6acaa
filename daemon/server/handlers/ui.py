"""The chat page at /ui: plain HTML, CSS and JS shipped in the package (daemon/ui), no CDN
and no build step. It is static and holds no data, so it is served without an API key; what
it asks of the API is keyed like any other client's request."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {"index.html": "text/html", "app.js": "text/javascript", "markdown.js": "text/javascript",
         "style.css": "text/css"}
# the page loads only its own files and talks only to this daemon
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
          "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def _file(name: str) -> web.Response:
    body = resources.files("daemon").joinpath("ui", name).read_bytes()
    return web.Response(body=body, content_type=FILES[name], charset="utf-8", headers={
        "Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in FILES:
        raise web.HTTPNotFound()
    return _file(name)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/{name}", asset)
