"""A local server that serves model repositories the way the Hugging Face Hub does, so
huggingface_hub (pointed at it with HF_ENDPOINT) and hfollama's downloader run for real.

Endpoints: GET /api/models/{repo}[/revision/{rev}]?blobs=true (model info with siblings,
sizes, git blob ids and LFS sha256), GET|HEAD /{repo}/resolve/{rev}/{path} (small files
directly with ETag and X-Repo-Commit; LFS files by a 302 to /cdn/{sha256}, as the Hub
redirects to its CDN), and ranged GETs. Gated repos answer 401/403 with X-Error-Code:
GatedRepo, unknown repos 404 RepoNotFound, unknown revisions 404 RevisionNotFound.
Test controls: per-file throttling, corruption, and a log of what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

LFS_THRESHOLD = 10_000  # bytes: bigger files go through LFS, as *.safetensors do on the Hub


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    gated: bool = False
    token: str | None = None  # the token that has access, for gated repos
    license: str = "apache-2.0"
    revisions: tuple[str, ...] = ("main",)

    def __post_init__(self):
        if not self.commit:
            h = hashlib.sha1()
            for k in sorted(self.files):
                h.update(k.encode() + self.files[k])
            self.commit = h.hexdigest()

    @staticmethod
    def from_folder(folder: Path, **kw) -> "Repo":
        return Repo({str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()},
                    **kw)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    throttle: dict[str, float] = field(default_factory=dict)  # path -> bytes per second
    corrupt: set[str] = field(default_factory=set)  # paths served with one byte flipped
    log: list[tuple[str, str, str | None, int]] = field(default_factory=list)  # (method, path, range, bytes sent)
    url: str = ""

    def _auth(self, request: web.Request, repo: Repo) -> web.Response | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
        if repo.gated and token != repo.token:
            status = 401 if token is None else 403
            return web.json_response({"error": "Access to model is restricted."}, status=status,
                                     headers={"X-Error-Code": "GatedRepo",
                                              "X-Error-Message": "Access to this model is restricted."})
        return None

    def _repo(self, org: str, name: str) -> Repo | web.Response:
        repo = self.repos.get(f"{org}/{name}")
        if repo is None:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound",
                                              "X-Error-Message": "Repository not found"})
        return repo

    def _revision_ok(self, repo: Repo, rev: str) -> bool:
        return rev in repo.revisions or rev == repo.commit

    async def model_info(self, request: web.Request) -> web.Response:
        repo = self._repo(request.match_info["org"], request.match_info["name"])
        if isinstance(repo, web.Response):
            return repo
        rev = request.match_info.get("rev", "main")
        if not self._revision_ok(repo, rev):
            return web.json_response({"error": "Invalid rev id"}, status=404,
                                     headers={"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for path, data in sorted(repo.files.items()):
            s = {"rfilename": path, "size": len(data), "blobId": git_oid(data)}
            if len(data) > LFS_THRESHOLD:
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response({"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                                  "private": False, "gated": "manual" if repo.gated else False,
                                  "siblings": siblings, "cardData": {"license": repo.license}, "tags": []})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request.match_info["org"], request.match_info["name"])
        if isinstance(repo, web.Response):
            return repo
        if not self._revision_ok(repo, request.match_info["rev"]):
            return web.json_response({"error": "Invalid rev id"}, status=404,
                                     headers={"X-Error-Code": "RevisionNotFound"})
        denied = self._auth(request, repo)
        if denied is not None:
            return denied
        path = request.match_info["path"]
        data = repo.files.get(path)
        if data is None:
            return web.json_response({"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"})
        common = {"X-Repo-Commit": repo.commit}
        if len(data) > LFS_THRESHOLD:
            sha = hashlib.sha256(data).hexdigest()
            return web.Response(status=302, headers={**common, "Location": f"/cdn/{sha}?path={path}",
                                                     "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                                                     "ETag": f'"{git_oid(data)}"'})
        return await self._send(request, path, data, {**common, "ETag": f'"{git_oid(data)}"'})

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        sha, path = request.match_info["sha"], request.query.get("path", "")
        for repo in self.repos.values():
            for p, data in repo.files.items():
                if hashlib.sha256(data).hexdigest() == sha:
                    return await self._send(request, p, data, {"ETag": f'"{sha}"'})
        return web.Response(status=404)

    async def _send(self, request: web.Request, path: str, data: bytes, headers: dict) -> web.StreamResponse:
        if path in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status = 0, 200
        range_header = request.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header[6:].split("-")[0])
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        response = web.StreamResponse(status=status, headers={**headers, "Accept-Ranges": "bytes",
                                                              "Content-Length": str(len(body))})
        await response.prepare(request)
        sent = 0
        rate = self.throttle.get(path)
        step = 8192 if rate else 1 << 20
        try:
            if request.method != "HEAD":
                for i in range(0, len(body), step):
                    await response.write(body[i:i + step])
                    sent += len(body[i:i + step])
                    if rate:
                        await asyncio.sleep(step / rate)
                await response.write_eof()
        finally:
            self.log.append((request.method, path, range_header, sent))
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.model_info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.model_info)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        app.router.add_get("/cdn/{sha}", self.cdn)
        return app

    def bytes_sent(self, path: str) -> int:
        return sum(sent for method, p, _, sent in self.log if p == path and method == "GET")


def start(server: HubServer):
    """Run the server on a thread; yields it with .url set."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def main():
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["port"] = site._server.sockets[0].getsockname()[1]
        state["stop"] = asyncio.Event()
        ready.set()
        await state["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(30)
    server.url = f"http://127.0.0.1:{state['port']}"
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(30)
