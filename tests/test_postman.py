"""The Postman collection (postman/) run by newman against the live daemon: every request's
test scripts must pass, every request must have them, and the collection must cover every
route the daemon serves."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

POSTMAN = Path(__file__).resolve().parent.parent / "postman"
COLLECTION = POSTMAN / "hfollama.postman_collection.json"
ENVIRONMENT = POSTMAN / "hfollama.postman_environment.json"


def newman() -> str | None:
    local = POSTMAN / "node_modules" / ".bin" / "newman"
    return str(local) if local.exists() else shutil.which("newman")


def requests_of(items: list[dict]) -> list[dict]:
    out = []
    for item in items:
        out.extend(requests_of(item["item"]) if "item" in item else [item])
    return out


def test_collection_covers_every_route(daemon):
    """Each route of the app (but the undocumented /api/status) has a request in the collection."""
    collection = json.loads(COLLECTION.read_text())
    assert collection["info"]["schema"].endswith("/v2.1.0/collection.json")
    covered = set()
    for item in requests_of(collection["item"]):
        path = "/" + "/".join(item["request"]["url"]["path"])
        covered.add((item["request"]["method"], path))
        scripts = [e for e in item.get("event", []) if e["listen"] == "test"]
        assert scripts and any("pm.test" in line for line in scripts[0]["script"]["exec"]), item["name"]
    routes = {(r.method, r.resource.canonical) for r in daemon.app.router.routes()}
    for method, route in routes:
        if route == "/api/status":
            continue
        pattern = route.replace("{digest}", "sha256:{{blobDigest}}").replace("{model}", "{{chatModel}}").replace(
            "{name}", "app.js")
        # aiohttp answers HEAD for every GET route: the GET request covers those
        also = {("GET", pattern)} if method == "HEAD" else set()
        assert ({(method, pattern)} | also) & covered, f"{method} {route} is not in the collection"


def test_environment_defaults_to_the_local_daemon():
    values = {v["key"]: v["value"] for v in json.loads(ENVIRONMENT.read_text())["values"]}
    assert values["baseUrl"] == "http://127.0.0.1:11434"


def test_newman_run_passes(daemon, tmp_path):
    binary = newman()
    if binary is None:
        pytest.skip("newman is not installed (needs Node.js; `make test` installs it with npm)")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [binary, "run", str(COLLECTION), "-e", str(ENVIRONMENT), "--env-var", f"baseUrl={daemon.url}",
         "--reporters", "cli,json", "--reporter-json-export", str(report), "--timeout-request", "300000"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    stats = json.loads(report.read_text())["run"]["stats"]
    total = len(requests_of(json.loads(COLLECTION.read_text())["item"]))
    assert stats["requests"] == {"total": total, "pending": 0, "failed": 0}
    assert stats["assertions"]["failed"] == 0 and stats["assertions"]["total"] >= 2 * total
