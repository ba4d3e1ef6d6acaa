"""A small HTTP client of the daemon for the CLI, as Ollama's CLI talks to its server.
Standard library only: the CLI must start fast and work wherever the package does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from daemon.config import parse_host


class ClientError(Exception):
    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def base_url(ollama_host: str) -> str:
    bind = parse_host(ollama_host)
    host = "127.0.0.1" if bind.host in ("0.0.0.0", "::") else bind.host
    host = f"[{host}]" if ":" in host else host
    prefix = f"/{bind.path}" if bind.path else ""
    return f"{bind.scheme}://{host}:{bind.port}{prefix}"


class Client:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        """api_key: sent as `Authorization: Bearer` (a daemon with HFOLLAMA_API_KEYS wants one);
        the CLI takes it from OLLAMA_API_KEY, as the ollama clients do."""
        self.url = url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _open(self, method: str, path: str, body: Any = None, data: bytes | None = None, timeout: float | None = None):
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {**self._auth, **({"Content-Type": "application/json"} if data is None else {})}
        request = urllib.request.Request(self.url + path, data=payload, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text or exc.reason
            raise ClientError(message, exc.code) from None
        except urllib.error.URLError as exc:
            raise ClientError(f"could not connect to hfollama at {self.url}: is it running? ({exc.reason})") from None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        with self._open(method, path, body) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._open("POST", path, {**body, "stream": True}) as response:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    raise ClientError(event["error"])
                yield event

    def upload_blob(self, path: Path, digest: str) -> None:
        try:
            self._open("HEAD", f"/api/blobs/{digest}").close()
            return
        except ClientError as exc:
            if exc.status != 404:
                raise
        with open(path, "rb") as f:
            self._open("POST", f"/api/blobs/{digest}", data=f.read()).close()
