"""`hfollama` / `python -m daemon`: the daemon and the client commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from daemon import OLLAMA_API_VERSION, __version__
from daemon.config import TRACE, Settings, parse_host
from daemon.durations import parse_keep_alive_env


def _serve(args: argparse.Namespace) -> int:
    from daemon.server.app import serve_forever

    keep_alive = parse_keep_alive_env(args.keep_alive, 0) if args.keep_alive else None
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
    )
    logging.addLevelName(TRACE, "TRACE")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfollama", description="Ollama-compatible daemon on Hugging Face models")
    parser.add_argument("-v", "--version", action="version",
                        version=f"hfollama {__version__} (Ollama API {OLLAMA_API_VERSION})")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="start the daemon")
    serve.add_argument("--host", help="bind address, as OLLAMA_HOST (default 127.0.0.1:11434)")
    serve.add_argument("--models", help="model store, as OLLAMA_MODELS (default ~/.hfollama/models)")
    serve.add_argument("--modelfiles", help="your modelfiles folder (default: beside the store)")
    serve.add_argument("--keep-alive", help="default keep_alive, as OLLAMA_KEEP_ALIVE (default 5m)")
    serve.add_argument("--origins", help="extra CORS origins, as OLLAMA_ORIGINS")
    serve.add_argument("--context-length", type=int, help="default num_ctx, as OLLAMA_CONTEXT_LENGTH")
    serve.add_argument("--parallel", type=int, help="sequences decoded together per model, as OLLAMA_NUM_PARALLEL")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    serve.add_argument("--debug", action="store_true", default=None, help="debug logging, as OLLAMA_DEBUG=1")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)
