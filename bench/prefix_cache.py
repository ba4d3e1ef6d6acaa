"""Prefix reuse and first-seen prompt lengths over HTTP (streaming /api/chat, Llama-3-8B shapes,
NF4 + double quant, random weights), the daemon in this process and the clients in another:

    python bench/prefix_cache.py --root /tmp/bench [--configs configs.json] [--uncached]

1. `sdpa`: each attention backend's first and second call at a few prompt lengths (what a
   backend that builds a plan per shape costs the first request of that shape).
2. `lengths`: right after a load, 50 prompts of random lengths from 100 to 8,000 tokens (no
   shared prefixes), then the same lengths again: each cold TTFT against the warm TTFTs of
   similar lengths (within 10%), and the Triton compiles the requests caused.
3. `conversation`: a chat over a 400-token system prompt growing by 664 tokens a turn (a
   600-token user message and the 64-token answer resent as the client got it), 6 turns and
   the last resent unchanged; each turn beside a fresh prompt of only its new tokens. Twice,
   with different text. `--uncached` runs it again on a daemon with the cache off.
4. `shared`: 32 concurrent requests sharing a 2,000-token system prompt (100 tokens of their
   own each), with a system prompt never seen before (cold) and then again (warm).

The tokenizer maps the word "tN" to token N, so a prompt's length in tokens is exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import aiohttp  # noqa: E402

from bench.gpu_serve import nf4_model, start_daemon  # noqa: E402
from daemon.config import Settings, parse_host  # noqa: E402

MODEL = "prefix:nf4"
CONTEXT = 8192


def words(rng: random.Random, n: int) -> str:
    """n tokens of text no other prompt starts with (ids below the special tokens)."""
    return " ".join(f"t{rng.randrange(1000, 120000)}" for _ in range(n))


# ---- the clients (another process) ----------------------------------------------------------

async def _chat(session: aiohttp.ClientSession, url: str, messages: list[dict], num_predict: int) -> dict:
    body = {"model": MODEL, "messages": messages, "stream": True,
            "options": {"num_predict": num_predict, "temperature": 0, "num_ctx": CONTEXT}}
    t0 = time.perf_counter()
    first, content = None, []
    async with session.post(url + "/api/chat", json=body) as r:
        async for raw in r.content:
            line = json.loads(raw)
            if "error" in line:
                raise RuntimeError(line["error"])
            piece = line.get("message", {}).get("content", "")
            if piece:
                first = first if first is not None else time.perf_counter() - t0
                content.append(piece)
            if line.get("done"):
                return {"ttft_ms": 1000 * (first if first is not None else time.perf_counter() - t0),
                        "prompt_eval_count": line.get("prompt_eval_count", 0), "eval_count": line["eval_count"],
                        "content": "".join(content)}
    raise RuntimeError(f"HTTP {r.status}: the stream ended without a final line")


async def _many(url: str, requests: list[tuple[list[dict], int]], concurrent: bool) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        if concurrent:
            return list(await asyncio.gather(*(_chat(session, url, m, n) for m, n in requests)))
        return [await _chat(session, url, m, n) for m, n in requests]


def chats(url: str, requests: list[tuple[list[dict], int]], concurrent: bool = False) -> list[dict]:
    return asyncio.run(_many(url, requests, concurrent))


async def _post(url: str, path: str, body: dict) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async with session.post(url + path, json=body) as r:
            return await r.json()


def post(url: str, path: str, body: dict) -> dict:
    return asyncio.run(_post(url, path, body))


def conversation(url: str, seed: int, turns: int = 6, system: int = 400, user: int = 600, answer: int = 64) -> list[dict]:
    """One chat, each turn's request followed by a fresh prompt of only that turn's new tokens;
    then the last request again, unchanged."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": words(rng, system)}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": words(rng, user)})
        new = system + user if turn == 0 else user + answer
        [got] = chats(url, [(list(messages), answer)])
        [fresh] = chats(url, [([{"role": "user", "content": words(rng, new)}], answer)])
        rows.append({"turn": turn, "new": new, **got, "fresh_ttft_ms": fresh["ttft_ms"]})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": got["content"]})
    [again] = chats(url, [(list(messages), answer)])
    rows.append({"turn": "resent", "new": 0, **again, "fresh_ttft_ms": None})
    return rows


# ---- the daemon's process -------------------------------------------------------------------

class Compiles:
    """Triton kernels compiled (or loaded from the disk cache) in this process since `mark`."""

    def __init__(self) -> None:
        import triton

        self.names: list[str] = []
        triton.knobs.runtime.jit_cache_hook = self._hook

    def _hook(self, *, fn, **_: object) -> bool:
        self.names.append(fn.name)
        return False  # compile as usual

    def mark(self) -> int:
        return len(self.names)

    def since(self, mark: int) -> list[str]:
        return self.names[mark:]


class Timeline:
    """Where a burst's time goes, seen from inside the daemon (it runs in this process): each
    request's prompt build (template + tokenizer), its arrival at the runner and its first
    chunk, and every pass the runner ran, with the prompt tokens and decode rows in it. The
    runner's methods are wrapped, not changed: the wrappers only read the clock."""

    def __init__(self) -> None:
        from daemon.engine import runner as R
        from daemon.server.handlers import inference

        self.events: list[tuple[float, float, str, str]] = []
        events = self.events
        generate, prefill, decode = R.Runner.generate, R.Runner._prefill, R.Runner._decode
        take, build = R.Runner._take_prefixes, inference._build

        async def timed_generate(runner, request):
            t, first = time.perf_counter(), True
            async for chunk in generate(runner, request):
                if first:
                    events.append((t, time.perf_counter(), "request", f"{len(request.prompt_ids)} tokens"))
                    first = False
                yield chunk

        def timed(fn, kind, describe):
            def wrapper(runner, *args):
                t, detail = time.perf_counter(), describe(runner, *args)  # before the call changes it
                try:
                    return fn(runner, *args)
                finally:
                    events.append((t, time.perf_counter(), kind, detail))
            return wrapper

        def prompt_tokens(runner, seqs, decoding):
            left = sum(len(q.prompt) - q.prefilled for q in seqs)
            return f"{min(left, runner.prefill_chunk)} prompt tokens of {len(seqs)}, {len(decoding)} decode rows"

        async def timed_build(*args):
            t = time.perf_counter()
            try:
                return await build(*args)
            finally:
                events.append((t, time.perf_counter(), "build", ""))

        R.Runner.generate = timed_generate
        R.Runner._prefill = timed(prefill, "prefill", prompt_tokens)
        R.Runner._decode = timed(decode, "decode", lambda runner, seqs: f"{len(seqs)} rows")
        R.Runner._take_prefixes = timed(take, "prefixes", lambda runner: "")
        inference._build = timed_build

    def mark(self) -> int:
        return len(self.events)

    def report(self, mark: int, title: str, passes: int = 40) -> None:
        """The events since `mark`, in ms from the first: builds and requests summarized,
        passes (and prefix copies over 1 ms) one a line until the last request's first chunk."""
        got = sorted(self.events[mark:])
        if not got:
            return
        zero = got[0][0]
        ms = lambda t: 1000 * (t - zero)  # noqa: E731
        builds = [e for e in got if e[2] == "build"]
        requests = [e for e in got if e[2] == "request"]
        print(f"\ntimeline: {title} (ms from the first event)")
        if builds:
            spans = sorted(1000 * (e[1] - e[0]) for e in builds)
            print(f"  prompt builds: {len(builds)}, started {ms(builds[0][0]):.1f}-{ms(builds[-1][0]):.1f}, "
                  f"each {spans[0]:.1f}-{spans[-1]:.1f} (median {statistics.median(spans):.1f})")
        if requests:
            arrivals = sorted(ms(e[0]) for e in requests)
            firsts = sorted(ms(e[1]) for e in requests)
            print(f"  at the runner: {arrivals[0]:.1f}-{arrivals[-1]:.1f} (median {statistics.median(arrivals):.1f});"
                  f" first chunks {firsts[0]:.1f}-{firsts[-1]:.1f} (median {statistics.median(firsts):.1f})")
        end = max((e[1] for e in requests), default=got[-1][1])
        shown = [e for e in got if e[2] in ("prefill", "decode") or (e[2] == "prefixes" and e[1] - e[0] > 1e-3)]
        for t0, t1, kind, detail in [e for e in shown if e[0] <= end][:passes]:
            print(f"  {ms(t0):8.1f} {ms(t1):8.1f}  {kind:<9}{detail}")


    def per_request(self, mark: int) -> list[tuple[float, ...]]:
        """For requests sent one at a time, in order: ms spent in the prompt build, from the
        build to the first pass, in passes, and from the last pass to the first chunk."""
        got = sorted(self.events[mark:])
        out = []
        for t0, t1, kind, detail in got:
            if kind != "request":
                continue
            builds = [e for e in got if e[2] == "build" and e[1] <= t0 + 1e-4]
            passes = [e for e in got if e[2] in ("prefill", "decode", "prefixes") and t0 <= e[0] and e[1] <= t1]
            build = builds[-1] if builds else (t0, t0)
            first = passes[0][0] if passes else t1
            last = passes[-1][1] if passes else t1
            out.append(tuple(1000 * x for x in (build[1] - build[0], first - build[1],
                                                sum(e[1] - e[0] for e in passes), t1 - last)))
        return out


def sdpa_probe(lengths=(1000, 2328, 4320, 8000)) -> list[tuple]:
    """Each backend's first and second call per length (Llama-3-8B heads, bf16, causal)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        for n in lengths:
            q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
            times = []
            try:
                with sdpa_kernel([backend]):
                    for _ in range(2):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, k, is_causal=True)
                        torch.cuda.synchronize()
                        times.append(1000 * (time.perf_counter() - t))
            except RuntimeError as e:
                times = [str(e).splitlines()[0][:40]] * 2
            rows.append((backend.name, n, *times))
    return rows


def similar_median(length: int, samples: list[tuple[int, float]]) -> float:
    return statistics.median(t for n, t in samples if abs(n - length) <= 0.1 * length)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--configs", default="", help="NF4 launch settings from bench/nf4_kernel.py --out")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--uncached", action="store_true", help="the conversation again with the cache off")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--profile", action="store_true",
                        help="the cold shared-prompt burst under torch.profiler: its top ops, host and device")
    args = parser.parse_args()
    if args.configs:
        from daemon.engine.cuda import gemv

        gemv.load_configs(Path(args.configs).read_text())
    root = Path(args.root)
    _, mf = nf4_model(root, args.shape, "prefix")
    compiles = Compiles()
    timeline = Timeline()

    print("\nattention backends, first and second call (ms), 32 heads x 128, bf16, causal")
    for name, n, first, second in sdpa_probe():
        print(f"{name:<22}{n:>6}  {first if isinstance(first, str) else f'{first:9.1f}':>9}"
              f"  {second if isinstance(second, str) else f'{second:9.1f}':>9}")

    def daemon(prefix_cache: bool):
        settings = Settings.from_env({}, bind=parse_host("127.0.0.1:0"), models_dir=root / "store",
                                     user_modelfiles_dir=mf, device="cuda", num_parallel=args.slots,
                                     context_length=CONTEXT, prefix_cache=prefix_cache)
        return start_daemon(settings)

    url, stop = daemon(True)
    clients = multiprocessing.get_context("spawn").Pool(1)
    try:
        # -- lengths: right after a load
        clients.apply(post, (url, "/api/generate", {"model": MODEL}))  # a first load (the process's one-time costs)
        clients.apply(post, (url, "/api/generate", {"model": MODEL, "keep_alive": 0}))
        t = time.perf_counter()
        clients.apply(post, (url, "/api/generate", {"model": MODEL}))
        print(f"\nload: {time.perf_counter() - t:.1f} s", flush=True)
        mark, events = compiles.mark(), timeline.mark()
        rng = random.Random(1)
        lengths = [rng.randrange(100, 8001) for _ in range(args.prompts)]
        cold = clients.apply(chats, (url, [([{"role": "user", "content": words(rng, n)}], 4) for n in lengths]))
        cold_compiles = compiles.since(mark)
        timeline.report(events, "the first prompts after the load", passes=6)
        cold_parts = timeline.per_request(events)
        mark, events = compiles.mark(), timeline.mark()
        warm = clients.apply(chats, (url, [([{"role": "user", "content": words(rng, n)}], 4) for n in lengths]))
        warm_compiles = compiles.since(mark)
        warm_parts = timeline.per_request(events)
        samples = [(n, r["ttft_ms"]) for n, r in zip(lengths, warm)]
        print(f"\n{args.prompts} prompts of random lengths right after a load, then the same lengths again")
        print(f"{'tokens':>7}{'cold TTFT':>11}{'warm':>9}{'similar':>9}{'cold/similar':>14}")
        worst = 0.0
        for n, c, w in sorted(zip(lengths, cold, warm), key=lambda row: row[0]):
            ratio = c["ttft_ms"] / similar_median(n, samples)
            worst = max(worst, ratio)
            print(f"{n:>7}{c['ttft_ms']:>9.1f}ms{w['ttft_ms']:>7.1f}ms{similar_median(n, samples):>7.1f}ms{ratio:>13.2f}x")
        print(f"worst cold TTFT / median of similar lengths: {worst:.2f}x (at most 1.5x)")
        print("\nwhere the short prompts' TTFT goes (ms): build, build to first pass, passes, last pass to chunk")
        for n, c, w in sorted(zip(lengths, cold_parts, warm_parts))[:8]:
            if c and w:
                print(f"{n:>7}  cold " + " ".join(f"{x:6.1f}" for x in c) + "   warm " + " ".join(f"{x:6.1f}" for x in w))
        print(f"Triton compiles in the request path: cold {len(cold_compiles)} {sorted(set(cold_compiles))}, "
              f"warm {len(warm_compiles)}")

        # -- conversation
        for seed in (2, 3):
            mark = compiles.mark()
            rows = clients.apply(conversation, (url, seed))
            table("conversation (prefix cache on)", rows, len(compiles.since(mark)))

        # -- shared system prompt
        rng = random.Random(4)
        system = words(rng, 2000)
        print(f"\n{args.slots} concurrent requests sharing a 2,000-token system prompt, 100 tokens of their own")
        print(f"{'system prompt':<15}{'TTFT p50':>10}{'p95':>9}{'max':>9}{'evaluated':>11}{'compiles':>10}")
        for label in ("cold", "warm"):
            mark, events = compiles.mark(), timeline.mark()
            requests = [([{"role": "system", "content": system}, {"role": "user", "content": words(rng, 100)}], 16)
                        for _ in range(args.slots)]
            profiler = None
            if args.profile and label == "cold":
                import torch

                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                              torch.profiler.ProfilerActivity.CUDA])
                profiler.__enter__()
            got = clients.apply(chats, (url, requests, True))
            if profiler is not None:
                profiler.__exit__(None, None, None)
                averages = profiler.key_averages()
                print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
                print(averages.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
            ttfts = sorted(r["ttft_ms"] for r in got)
            print(f"{label:<15}{statistics.median(ttfts):>8.1f}ms{ttfts[int(0.95 * (len(ttfts) - 1))]:>7.1f}ms"
                  f"{ttfts[-1]:>7.1f}ms{sum(r['prompt_eval_count'] for r in got):>11}{len(compiles.since(mark)):>10}")
            timeline.report(events, f"32 sharing a system prompt, {label}")
        ps = clients.apply(_ps, (url,))
        print(f"\n/api/ps kv_cache: {ps}")
    finally:
        clients.terminate()
        stop()

    if args.uncached:
        url, stop = daemon(False)
        clients = multiprocessing.get_context("spawn").Pool(1)
        try:
            clients.apply(post, (url, "/api/generate", {"model": MODEL}))
            table("conversation (prefix cache off)", clients.apply(conversation, (url, 2)), None)
        finally:
            clients.terminate()
            stop()


def _ps(url: str) -> list:
    async def get():
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/api/ps") as r:
                return [m.get("kv_cache") for m in (await r.json())["models"]]
    return asyncio.run(get())


def table(title: str, rows: list[dict], compiled: int | None) -> None:
    print(f"\n{title}" + (f", Triton compiles: {compiled}" if compiled is not None else ""))
    print(f"{'turn':>7}{'prompt':>8}{'evaluated':>11}{'TTFT':>9}{'fresh new-only':>16}{'ratio':>8}")
    prompt = 0
    for row in rows:
        prompt += row["new"]
        fresh = row["fresh_ttft_ms"]
        print(f"{row['turn']:>7}{prompt:>8}{row['prompt_eval_count']:>11}{row['ttft_ms']:>7.1f}ms"
              + (f"{fresh:>14.1f}ms{row['ttft_ms'] / fresh:>7.2f}x" if fresh else ""))


if __name__ == "__main__":
    main()
