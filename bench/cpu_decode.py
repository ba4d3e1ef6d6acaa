"""Decode speed on the CPU: transformers' model.generate() against hfollama's own loop, on the
same loaded model, in one run. Prints one table.

    python bench/cpu_decode.py [--model smollm2:135m] [--tokens 128] [--reps 3]

Both are forced to generate the full length (no EOS stop) with greedy decoding. Decode
tokens/s = (N - 1) / (time for N new tokens - time for 1 new token), so prefill and set-up
cancel out, measured the same way for both. The median of --reps runs is reported. CPU
numbers are for regressions: compare the ratio, not the absolute figure, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from daemon.backends.transformers_backend import load_causal_lm  # noqa: E402
from daemon.config import Settings  # noqa: E402
from daemon.engine.forward import ReferenceForward  # noqa: E402
from daemon.engine.params import GenerationRequest, SamplingParams  # noqa: E402
from daemon.engine.runner import Runner  # noqa: E402
from daemon.names import ModelName  # noqa: E402
from daemon.server.app import build_catalog  # noqa: E402
from daemon.store.derived import DerivedCache  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_generate(model, ids: torch.Tensor, n: int) -> float:
    def run(k: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    run(2)  # warm-up
    return (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


async def _run_ours(runner: Runner, ids: list[int], n: int, concurrent: int) -> None:
    request = GenerationRequest(tuple(ids), SamplingParams(temperature=0.0), max_new_tokens=n)

    async def one() -> None:
        async for _ in runner.generate(request):
            pass
    await asyncio.gather(*(one() for _ in range(concurrent)))


def bench_ours(runner: Runner, ids: list[int], n: int, concurrent: int = 1) -> float:
    def run(k: int) -> None:
        asyncio.run(_run_ours(runner, ids, k, concurrent))
    run(2)
    return concurrent * (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--store", default=os.environ.get("OLLAMA_MODELS") or str(Path(tempfile.gettempdir()) / "hfollama-bench"))
    args = parser.parse_args()

    settings = Settings.from_env(models_dir=Path(args.store), device="cpu")
    resolved = build_catalog(settings).resolve(ModelName.parse(args.model))
    t = time.perf_counter()
    loaded = load_causal_lm(resolved, torch.device("cpu"), DerivedCache(Path(args.store) / "derived"))
    print(f"loaded {args.model} in {time.perf_counter() - t:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    tok = loaded.tokenizer
    ids = tok.encode(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    # the baseline first: ReferenceForward takes the HF model's layers over
    base = statistics.median(bench_generate(loaded.model, torch.tensor([ids]), args.tokens) for _ in range(args.reps))
    forward = ReferenceForward(loaded.model, num_slots=4, max_ctx=len(ids) + args.tokens + 8)
    runner = Runner(forward, tok, eos_token_ids=[])  # no EOS: always the full length
    rows = []
    try:
        ours = statistics.median(bench_ours(runner, ids, args.tokens) for _ in range(args.reps))
        ours4 = statistics.median(bench_ours(runner, ids, args.tokens, 4) for _ in range(args.reps))
        rows = [("model.generate(), batch 1", base, 1.0), ("hfollama loop, 1 request", ours, ours / base),
                ("hfollama loop, 4 concurrent (aggregate)", ours4, ours4 / base)]
    finally:
        runner.close()
    print(f"\n{args.model}, prompt {len(ids)} tokens, {args.tokens} new tokens, greedy, median of {args.reps}")
    print(f"{'path':<42}{'decode tok/s':>14}{'vs generate()':>15}")
    for name, rate, ratio in rows:
        print(f"{name:<42}{rate:>14.1f}{ratio:>14.2f}x")


if __name__ == "__main__":
    main()
