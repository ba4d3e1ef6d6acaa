"""The daemon over HTTP with concurrent streaming /api/chat requests (Llama-3-8B shapes, NF4,
random weights, full-length generations), against sequential serving (one slot) in the same run.

    python bench/gpu_serve.py --root /tmp/bench [--concurrency 1 8 32] [--tokens 256]

Per concurrency: aggregate tokens/s (all tokens / wall time), per-stream tokens/s (the
daemon's eval_count / eval_duration), time to first token p50 / p95 (first content line).
Each level runs `--repeats` times; the table gives the run with the median aggregate, and the
lowest and highest aggregate beside it (one run says little on a shared machine). No warm-up
but the load (one 8-token request): the first wave at each level is the first burst of that
shape after the load, printed beside the second. GPU memory after the load and at the end
(PyTorch's allocated and peak reserved, and what /api/ps reports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import aiohttp  # noqa: E402

from bench.dummy_models import SHAPES, write_checkpoint  # noqa: E402
from daemon.config import Settings, parse_host  # noqa: E402

QUANT = "{mode: nf4, double_quant: true, compute_dtype: bfloat16}"


def nf4_model(root: Path, shape: str, name: str) -> tuple[Path, Path]:
    """The shape's random checkpoint (written once) and a modelfiles folder naming it `name:nf4`
    with QUANT: (checkpoint, modelfiles folder)."""
    checkpoint = write_checkpoint(root / f"{shape}-random", shape=shape)
    modelfiles = root / f"modelfiles-{name}"
    modelfiles.mkdir(parents=True, exist_ok=True)
    (modelfiles / f"{name}.yaml").write_text(
        f"tags:\n  nf4:\n    source: {{path: '{checkpoint}'}}\n    quantization: {QUANT}\n")
    return checkpoint, modelfiles


def start_daemon(settings: Settings):
    from daemon.server.app import create_app, start_server

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def main():
        runner, port = await start_server(create_app(settings), "127.0.0.1", 0)
        state.update(port=port, stop=asyncio.Event())
        ready.set()
        await state["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(60)

    def stop():
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(120)
    return f"http://127.0.0.1:{state['port']}", stop


async def stream_chat(session, url: str, body: dict) -> tuple[float, dict]:
    """A streaming /api/chat: seconds to its first content line (TTFT), and its final line."""
    t0 = time.perf_counter()
    first = None
    async with session.post(url + "/api/chat", json=body) as r:
        async for raw in r.content:
            line = json.loads(raw)
            if "error" in line:
                raise RuntimeError(line["error"])
            if first is None and line.get("message", {}).get("content"):
                first = time.perf_counter() - t0
            if line.get("done"):
                return first or (time.perf_counter() - t0), line
    raise RuntimeError(f"HTTP {r.status}: the stream ended without a final line")


async def one(session, url, model, tokens, i):
    body = {"model": model, "messages": [{"role": "user", "content": " ".join(f"t{1000 + 37 * j + i}" for j in range(120))}],
            "options": {"num_predict": tokens, "temperature": 0}, "stream": True}
    first, line = await stream_chat(session, url, body)
    return first, line["eval_count"], line["eval_duration"]


async def wave(url, model, concurrency, tokens):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        t = time.perf_counter()
        results = await asyncio.gather(*(one(session, url, model, tokens, i) for i in range(concurrency)))
        wall = time.perf_counter() - t
    ttfts = sorted(r[0] for r in results)
    total = sum(r[1] for r in results)
    per_stream = statistics.median(r[1] / (r[2] / 1e9) for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    return total / wall, per_stream, statistics.median(ttfts) * 1000, p95 * 1000


def memory(url: str) -> str:
    """The GPU memory the daemon (this process) holds, and /api/ps's account of the model."""
    import torch

    with urllib.request.urlopen(url + "/api/ps") as r:
        models = json.loads(r.read())["models"]
    ps = ", ".join(f"{m['name']} size {m['size'] / 2**30:.2f} GiB (vram {m['size_vram'] / 2**30:.2f})" for m in models)
    return (f"allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, peak reserved "
            f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB; /api/ps: {ps}")


def run_wave(url: str, model: str, concurrency: int, tokens: int) -> tuple:
    return asyncio.run(wave(url, model, concurrency, tokens))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=8, help="requests for the one-slot baseline (0: skip)")
    parser.add_argument("--batch-weights", default="off", choices=("on", "off"),
                        help="HFOLLAMA_BATCH_WEIGHTS: a bf16 copy of the NF4 matrices for long prompt passes")
    parser.add_argument("--configs", default="", help="NF4 launch settings from bench/nf4_kernel.py --out")
    parser.add_argument("--repeats", type=int, default=3, help="waves per concurrency level")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="bench/dummy_models.py")
    args = parser.parse_args()
    if args.configs:
        from daemon.engine.cuda import gemv

        gemv.load_configs(Path(args.configs).read_text())
    root = Path(args.root)
    checkpoint, mf = nf4_model(root, args.shape, "serve")
    print(f"{args.shape}: {checkpoint}", flush=True)
    rows, first = [], []
    for slots, label, levels in ((args.slots, "batched", args.concurrency),
                                 (1, "one slot (sequential)", [args.sequential] if args.sequential else [])):
        if not levels:
            continue
        settings = Settings.from_env({}, bind=parse_host("127.0.0.1:0"), models_dir=root / "store",
                                     user_modelfiles_dir=mf, device="cuda", num_parallel=slots, context_length=2048,
                                     batch_weights=args.batch_weights)
        url, stop = start_daemon(settings)
        # the clients run in another process, as real ones do: not competing with the daemon
        # for its GIL
        clients = multiprocessing.get_context("spawn").Pool(1)
        try:
            clients.apply(run_wave, (url, "serve:nf4", 1, 8))  # the load (and its capture)
            print(label, "after the load:", memory(url), flush=True)
            for c in levels:
                in_order = [clients.apply(run_wave, (url, "serve:nf4", c, args.tokens))
                            for _ in range(max(2, args.repeats))]
                for i, run in enumerate(in_order):
                    print(label, c, f"wave {i + 1}", tuple(round(v, 1) for v in run), flush=True)
                first.append((label, c, in_order[0], in_order[1]))
                runs = sorted(in_order)
                rows.append((label, c) + runs[len(runs) // 2] + (runs[0][0], runs[-1][0]))
            print(label, "at the end:", memory(url), flush=True)
        finally:
            clients.terminate()
            stop()
    print(f"\n{args.shape} shapes, NF4 + double quant, random weights, {args.tokens} new tokens per request, HTTP /api/chat")
    print(f"{'serving':<24}{'concurrent':>11}{'aggregate tok/s':>17}{'per stream':>12}{'TTFT p50':>10}{'p95':>8}"
          f"{'aggregate range':>18}")
    for label, c, agg, per, p50, p95, low, high in rows:
        print(f"{label:<24}{c:>11}{agg:>17.0f}{per:>12.1f}{p50:>9.0f}ms{p95:>6.0f}ms{low:>10.0f}-{high:.0f}")
    print("\nthe first burst after the load against the second (aggregate tok/s, TTFT p50 / p95)")
    for label, c, one, two in first:
        print(f"{label:<24}{c:>11}   {one[0]:.0f} / {one[2]:.0f} / {one[3]:.0f} ms   against   "
              f"{two[0]:.0f} / {two[2]:.0f} / {two[3]:.0f} ms")


if __name__ == "__main__":
    main()
