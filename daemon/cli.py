"""`hfollama` / `python -m daemon`: the daemon, and client commands that talk to it over
HTTP as Ollama's CLI does (OLLAMA_HOST says where)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib

import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from daemon import OLLAMA_API_VERSION, __version__
from daemon.client import Client, ClientError, base_url
from daemon.config import TRACE, Settings, parse_host, read_api_key_file
from daemon.durations import parse_keep_alive_env
from daemon.logs import configure_logging


# ---- serve ------------------------------------------------------------------------------

# libgomp's waiting, set before torch loads it (a user's own settings win): its workers spin this
# long between parallel regions even while other threads hold pools of their own (an embedding
# model's beside a chat model's runner), where by default they would sleep after 1,000 spins and
# every one of a CPU decode step's ~300 regions would wait for them to wake (scheduler.in_own_thread)
OPENMP_WAITING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def _serve(args: argparse.Namespace) -> int:
    for name, value in OPENMP_WAITING.items():
        os.environ.setdefault(name, value)
    from daemon.server.app import serve_forever

    keep_alive = parse_keep_alive_env(args.keep_alive, 0) if args.keep_alive else None
    try:
        keys = tuple(args.api_key or ())
        for path in args.api_key_file or ():
            keys += read_api_key_file(Path(path))
        settings = _serve_settings(args, keep_alive, keys)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    logging.addLevelName(TRACE, "TRACE")
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).info("models in %s, modelfiles in %s", settings.models_dir, settings.modelfiles_dir)

    loop = asyncio.new_event_loop()
    task = loop.create_task(serve_forever(settings))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    except OSError as exc:
        print(f"Error: listen on {settings.bind.host}:{settings.bind.port}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


def _serve_settings(args: argparse.Namespace, keep_alive: int | None, keys: tuple[str, ...]) -> Settings:
    settings = Settings.from_env(
        bind=parse_host(args.host) if args.host else None,
        models_dir=Path(args.models).expanduser() if args.models else None,
        user_modelfiles_dir=Path(args.modelfiles).expanduser() if args.modelfiles else None,
        keep_alive_ns=keep_alive,
        origins=tuple(o.strip() for o in args.origins.split(",") if o.strip()) if args.origins else None,
        context_length=args.context_length,
        log_level=logging.DEBUG if args.debug else None,
        num_parallel=args.parallel,
        device=args.device,
        gpu_memory=args.gpu_memory,
        log_format=args.log_format,
    )
    if keys:  # flags add to the environment's keys
        settings = settings.with_overrides(api_keys=settings.api_keys + keys)
    return settings


# ---- output helpers ---------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} TB"


def ago(iso: str) -> str:
    then = datetime.datetime.fromisoformat(iso)
    seconds = (datetime.datetime.now(then.tzinfo) - then).total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


class Progress:
    """Ollama-style progress: one bar per file digest, redrawn in place on a terminal."""

    def __init__(self, out=sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_status = ""
        self.started: dict[str, tuple[float, int]] = {}

    def update(self, event: dict[str, Any]) -> None:
        status = event.get("status", "")
        total = event.get("total")
        if total:
            done = event.get("completed", 0)
            t0, c0 = self.started.setdefault(status, (time.monotonic(), done))
            rate = (done - c0) / max(time.monotonic() - t0, 1e-6)
            bar = "█" * int(20 * done / total)
            line = f"{status}: {100 * done // total:3d}% ▕{bar:<20}▏ {human_bytes(done)}/{human_bytes(total)}"
            if rate > 0 and done < total:
                line += f"  {human_bytes(rate)}/s"
            if self.tty:
                end = "\n" if done >= total else ""
                print("\r" + line.ljust(78), end=end, file=self.out, flush=True)
            elif done >= total and status != self.last_status:
                print(line, file=self.out)
        elif status != self.last_status:
            print(status, file=self.out, flush=True)
        self.last_status = status


def _client() -> Client:
    return Client(base_url(os.environ.get("OLLAMA_HOST", "")), os.environ.get("OLLAMA_API_KEY") or None)


def _pull(client: Client, model: str) -> None:
    progress = Progress()
    for event in client.stream("/api/pull", {"model": model}):
        progress.update(event)


# ---- commands ---------------------------------------------------------------------------

def _cmd_pull(args: argparse.Namespace) -> int:
    _pull(_client(), args.model)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    models = _client().request("GET", "/api/tags")["models"]
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    rows += [[m["name"], m["digest"][:12], human_bytes(m["size"]), ago(m["modified_at"])] for m in models]
    print(table(rows))
    return 0


def _cmd_ps(args: argparse.Namespace) -> int:
    models = _client().request("GET", "/api/ps")["models"]
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        vram, size = m.get("size_vram", 0), m["size"]
        processor = "100% GPU" if vram >= size else "100% CPU" if vram == 0 else \
            f"{100 * (size - vram) // size}%/{100 * vram // size}% CPU/GPU"
        until = datetime.datetime.fromisoformat(m["expires_at"])
        remaining = (until - datetime.datetime.now(until.tzinfo)).total_seconds()
        when = "Forever" if remaining > 20 * 365 * 86400 else f"{max(0, int(remaining // 60))} minutes from now"
        rows.append([m["name"], m["digest"][:12], human_bytes(size), processor, str(m.get("context_length", "")),
                     when])
    print(table(rows))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    info = _client().request("POST", "/api/show", {"model": args.model})
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        if getattr(args, flag):
            print(info.get(flag, ""))
            return 0
    mi, details = info.get("model_info", {}), info.get("details", {})
    arch = mi.get("general.architecture", details.get("family", ""))
    rows = [["architecture", arch], ["parameters", details.get("parameter_size", "")],
            ["context length", str(mi.get(f"{arch}.context_length", ""))],
            ["embedding length", str(mi.get(f"{arch}.embedding_length", ""))],
            ["quantization", details.get("quantization_level", "")]]
    print("  Model\n" + "\n".join(f"    {k:<20}{v}" for k, v in rows))
    print("\n  Capabilities\n" + "\n".join(f"    {c}" for c in info.get("capabilities", [])))
    if info.get("parameters"):
        print("\n  Parameters\n" + "\n".join(f"    {p}" for p in info["parameters"].splitlines()))
    if info.get("system"):
        print("\n  System\n    " + info["system"])
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    client = _client()
    for model in args.models:
        client.request("DELETE", "/api/delete", {"model": model})
        print(f"deleted '{model}'")
    return 0


def _cmd_cp(args: argparse.Namespace) -> int:
    _client().request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    _client().request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def create_body(text: str, filename: str, base_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """An /api/create body from a YAML modelfile tag or an Ollama Modelfile, plus the local
    files (FROM a path) that must be uploaded as blobs."""
    if filename.endswith((".yaml", ".yml")):
        import yaml

        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{filename}: expected a mapping")
        body = {k: v for k, v in doc.items() if k in ("from", "source", "quantization", "parameters", "system",
                                                       "template", "license", "messages")}
        if "stop" in doc:
            body.setdefault("parameters", {})["stop"] = doc["stop"]
        if "source" in body and "path" in body["source"]:
            body["from"] = body.pop("source")["path"]
    else:
        from daemon.registry.ollama_modelfile import parse

        body = parse(text)
    uploads: dict[str, Path] = {}
    base = body.get("from")
    if isinstance(base, str):
        local = (base_dir / os.path.expanduser(base)).resolve()
        if local.is_file():
            uploads[local.name] = local
        elif local.is_dir():
            for p in sorted(local.rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    uploads[str(p.relative_to(local))] = p
        if uploads:
            del body["from"]
    return body, uploads


def _cmd_create(args: argparse.Namespace) -> int:
    path = Path(args.file)
    body, uploads = create_body(path.read_text(), path.name, path.parent)
    client = _client()
    if uploads:
        files = {}
        for rel, local in uploads.items():
            digest = _file_digest(local)
            print(f"copying file {digest}", file=sys.stderr)
            client.upload_blob(local, digest)
            files[rel] = digest
        body["files"] = files
    progress = Progress()
    for event in client.stream("/api/create", {**body, "model": args.model}):
        progress.update(event)
    return 0


def _ensure_model(client: Client, model: str) -> None:
    try:
        client.request("POST", "/api/show", {"model": model})
    except ClientError as exc:
        if exc.status != 404:
            raise
        _pull(client, model)


def _read_input(prompt: str) -> str | None:
    """One message from the terminal; \"\"\" starts and ends a multi-line message."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        try:
            lines.append(input("... "))
        except EOFError:
            break
    text = "\n".join(lines)
    return text.rstrip()[:-3] if text.rstrip().endswith('"""') else text


# Image paths in a prompt, as Ollama's CLI finds them: absolute, ~ or ./ relative, or a bare file
# name, ending in an image extension; quoted, or with escaped spaces.
_IMAGE_PATH = re.compile(r"""(?:'([^']+\.(?:jpe?g|png|webp))'|"([^"]+\.(?:jpe?g|png|webp))"|"""
                         r"""((?:[~.]?/|[A-Za-z]:\\)?(?:[^\s\\]|\\ )+\.(?:jpe?g|png|webp)))""", re.IGNORECASE)


def user_message(text: str, err=sys.stderr) -> dict[str, Any]:
    """The user's message, its image files (those that exist) read and attached as base64 and
    their paths taken out of the text, as `ollama run` does."""
    images = []
    for match in _IMAGE_PATH.finditer(text):
        raw = next(g for g in match.groups() if g)
        path = Path(raw.replace("\\ ", " ")).expanduser()
        if not path.is_file():
            continue
        images.append(base64.b64encode(path.read_bytes()).decode())
        text = text.replace(match.group(0), "")
        print(f"Added image '{path}'", file=err)
    message: dict[str, Any] = {"role": "user", "content": " ".join(text.split()) if images else text}
    if images:
        message["images"] = images
    return message


def _chat_once(client: Client, model: str, messages: list[dict[str, Any]], out=sys.stdout) -> str:
    reply = []
    for event in client.stream("/api/chat", {"model": model, "messages": messages}):
        piece = event.get("message", {}).get("content", "")
        reply.append(piece)
        print(piece, end="", file=out, flush=True)
    print(file=out)
    return "".join(reply)


def chat_repl(client: Client, model: str, read_line=_read_input, out=sys.stdout, err=sys.stderr) -> None:
    """The interactive chat of `run`: streams each answer and keeps the conversation."""
    messages: list[dict[str, Any]] = []
    print("Send a message (/? for help)", file=err)
    while True:
        text = read_line(">>> ")
        if text is None or text.strip() in ("/bye", "/exit"):
            return
        if not text.strip():
            continue
        if text.strip() == "/clear":
            messages.clear()
            print("Cleared session context", file=err)
            continue
        if text.strip() in ("/?", "/help"):
            print('Commands: /bye to exit, /clear to forget the conversation. Use """ to begin and end a '
                  "multi-line message.", file=err)
            continue
        messages.append(user_message(text, err))
        messages.append({"role": "assistant", "content": _chat_once(client, model, messages, out)})


def _cmd_run(args: argparse.Namespace) -> int:
    client = _client()
    _ensure_model(client, args.model)
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        prompt = f"{prompt}\n{piped}".strip() if prompt else piped.strip()
    if prompt:
        _chat_once(client, args.model, [user_message(prompt)])
        return 0
    client.request("POST", "/api/generate", {"model": args.model})  # load while the user types
    chat_repl(client, args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfollama", description="Ollama-compatible daemon on Hugging Face models")
    parser.add_argument("-v", "--version", action="version",
                        version=f"hfollama {__version__} (Ollama API {OLLAMA_API_VERSION})")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="start the daemon")
    serve.add_argument("--host", help="bind address, as OLLAMA_HOST (default 127.0.0.1:11434)")
    serve.add_argument("--models", help="model store, as OLLAMA_MODELS (default ~/.hfollama/models)")
    serve.add_argument("--modelfiles", help="your modelfiles folder, as HFOLLAMA_MODELFILES")
    serve.add_argument("--keep-alive", help="default keep_alive, as OLLAMA_KEEP_ALIVE (default 5m)")
    serve.add_argument("--origins", help="extra CORS origins, as OLLAMA_ORIGINS")
    serve.add_argument("--context-length", type=int, help="default num_ctx, as OLLAMA_CONTEXT_LENGTH")
    serve.add_argument("--parallel", type=int, help="sequences decoded together per model, as OLLAMA_NUM_PARALLEL")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    serve.add_argument("--gpu-memory", help="memory budget for loaded models: 24GiB, or a fraction of the GPU "
                                            "(0.9); on a machine without GPU, of host memory (HFOLLAMA_GPU_MEMORY)")
    serve.add_argument("--debug", action="store_true", default=None, help="debug logging, as OLLAMA_DEBUG=1")
    serve.add_argument("--api-key", action="append", metavar="KEY",
                       help="require this API key (repeatable; adds to HFOLLAMA_API_KEYS)")
    serve.add_argument("--api-key-file", action="append", metavar="PATH",
                       help="require one of the keys in this file, one per line (as HFOLLAMA_API_KEYS_FILE)")
    serve.add_argument("--log-format", choices=("text", "json"), help="log lines, as HFOLLAMA_LOG_FORMAT")
    serve.set_defaults(func=_serve)

    run = sub.add_parser("run", help="chat with a model (pulls it first if needed)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="answer this and exit, instead of an interactive chat")
    run.set_defaults(func=_cmd_run)
    pull = sub.add_parser("pull", help="download a model")
    pull.add_argument("model")
    pull.set_defaults(func=_cmd_pull)
    for name in ("list", "ls"):
        sub.add_parser(name, help="list models").set_defaults(func=_cmd_list)
    sub.add_parser("ps", help="list loaded models").set_defaults(func=_cmd_ps)
    show = sub.add_parser("show", help="show a model's details")
    show.add_argument("model")
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        show.add_argument(f"--{flag}", action="store_true")
    show.set_defaults(func=_cmd_show)
    rm = sub.add_parser("rm", help="delete models")
    rm.add_argument("models", nargs="+")
    rm.set_defaults(func=_cmd_rm)
    cp = sub.add_parser("cp", help="copy a model")
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.set_defaults(func=_cmd_cp)
    stop = sub.add_parser("stop", help="unload a model")
    stop.add_argument("model")
    stop.set_defaults(func=_cmd_stop)
    create = sub.add_parser("create", help="create a model from a modelfile (YAML or Ollama syntax)")
    create.add_argument("model")
    create.add_argument("-f", "--file", default="Modelfile")
    create.set_defaults(func=_cmd_create)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"Error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


