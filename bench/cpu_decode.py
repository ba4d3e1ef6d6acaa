"""The embedded default on the CPU against llama.cpp on the same GGUF, the same machine, the
same run. Prints one table.

    python bench/cpu_decode.py [--model smollm2:135m] [--tokens 128] [--reps 5]
                               [--llama DIR] [--first-answer]

Decode: hfollama's own loop (the runner the daemon serves with) at 1 request and at 8
concurrent requests, forced to the full length (no EOS), greedy; tokens/s = (N - 1) / (time
for N new tokens - time for 1), so prefill and set-up cancel out. The peer (--llama: a folder
holding llama.cpp's `llama-bench` and `llama-batched-bench`, CPU only, built by
`bench/build_llama_cpp.sh --cpu`) decodes the same file: tg at batch 1, and the aggregate
S_TG of 8 parallel sequences with the same prompt length. The two take turns, rep by rep,
so that a noisy neighbour on a shared machine slows both; each row is the median.

Loads: the first load into an empty store (the tokenizer converted, the blocks packed) and a
second one. --first-answer also starts `hfollama serve` on an empty store in a fresh process
and times its first /api/chat answer from the process's start (what a new user waits), and
checks that the answer names Paris.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from daemon.cli import OPENMP_WAITING  # noqa: E402

for _name, _value in OPENMP_WAITING.items():  # as `hfollama serve` sets them, before torch loads libgomp
    os.environ.setdefault(_name, _value)

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
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONCURRENT = 8


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def _run_ours(runner: Runner, ids: list[int], n: int, concurrent: int) -> None:
    request = GenerationRequest(tuple(ids), SamplingParams(temperature=0.0), max_new_tokens=n)

    async def one() -> None:
        async for _ in runner.generate(request):
            pass
    await asyncio.gather(*(one() for _ in range(concurrent)))


def bench_ours(runner: Runner, ids: list[int], n: int, concurrent: int) -> float:
    def run(k: int) -> None:
        asyncio.run(_run_ours(runner, ids, k, concurrent))
    run(2)
    return concurrent * (n - 1) / (timed(lambda: run(n)) - timed(lambda: run(1)))


def llama_batch1(folder: Path, gguf: Path, n: int) -> float:
    out = subprocess.run([str(folder / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n), "-t",
                          str(torch.get_num_threads()), "-r", "1", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def llama_parallel(folder: Path, gguf: Path, prompt: int, n: int, sequences: int) -> float:
    out = subprocess.run([str(folder / "llama-batched-bench"), "-m", str(gguf), "-c", str(sequences * (prompt + n) + 64),
                          "-npp", str(prompt), "-ntg", str(n), "-npl", str(sequences), "-t",
                          str(torch.get_num_threads())], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2] == str(sequences) and re.fullmatch(r"[\d.]+", cells[7]):
            return float(cells[7])  # S_TG t/s
    raise RuntimeError("llama-batched-bench printed no S_TG row:\n" + out[-2000:])


def first_answer(model: str) -> tuple[float, str]:
    """Seconds from starting `hfollama serve` on an empty store to its first answer."""
    with tempfile.TemporaryDirectory() as store:
        env = dict(os.environ, OLLAMA_MODELS=store, OLLAMA_HOST="127.0.0.1:11498")
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        try:
            body = json.dumps({"model": model, "messages": QUESTION, "stream": False,
                               "options": {"temperature": 0}}).encode()
            while True:
                try:
                    request = urllib.request.Request("http://127.0.0.1:11498/api/chat", body,
                                                     {"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=300) as response:
                        answer = json.loads(response.read())["message"]["content"]
                    return time.perf_counter() - started, answer
                except (ConnectionError, urllib.error.URLError):
                    if proc.poll() is not None or time.perf_counter() - started > 300:
                        raise RuntimeError("the daemon did not answer") from None
                    time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--llama", type=Path, help="folder with llama.cpp's llama-bench and llama-batched-bench")
    parser.add_argument("--first-answer", action="store_true")
    parser.add_argument("--torch-kernels", action="store_true",
                        help="PyTorch's int4 / int8 kernels, not engine/cpu_kernels.py's (the comparison)")
    args = parser.parse_args()
    if args.torch_kernels:
        from daemon.engine import cpu_kernels

        cpu_kernels.load = lambda: None

    rows: list[tuple[str, str, str]] = []
    if args.first_answer:
        seconds, answer = first_answer(args.model)
        rows.append(("first answer after install (serve start to /api/chat)", f"{seconds:.1f} s",
                     "Paris" if "Paris" in answer else f"WRONG: {answer!r}"))

    def load() -> tuple:
        """As the daemon loads (scheduler.in_own_thread): in a thread that ends with the load,
        so that only the runner's thread keeps an OpenMP pool."""
        with tempfile.TemporaryDirectory() as store:
            settings = Settings.from_env(models_dir=Path(store), device="cpu")
            resolved = build_catalog(settings).resolve(ModelName.parse(args.model))
            derived = DerivedCache(Path(store) / "derived")
            loads = []
            for _ in range(2):
                t = time.perf_counter()
                loaded = load_causal_lm(resolved, torch.device("cpu"), derived)
                loads.append(time.perf_counter() - t)
        tok = loaded.tokenizer
        ids = tok.encode(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)
        forward = ReferenceForward(loaded.model, num_slots=CONCURRENT, max_ctx=len(ids) + args.tokens + 8)
        return resolved, loaded, loads, ids, forward

    done: list[tuple] = []
    worker = threading.Thread(target=lambda: done.append(load()))
    worker.start()
    worker.join()
    if not done:
        raise SystemExit("the load failed (see above)")
    resolved, loaded, loads, ids, forward = done[0]
    rows.append(("load, first / later", f"{loads[0]:.1f} / {loads[1]:.1f} s", ""))
    tok = loaded.tokenizer
    question = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)
    answer_runner = Runner(forward, tok, eos_token_ids=loaded.eos_token_ids)

    async def answer() -> str:
        request = GenerationRequest(tuple(question), SamplingParams(temperature=0.0), max_new_tokens=24)
        return "".join([chunk.text async for chunk in answer_runner.generate(request)])
    text = asyncio.run(answer())
    answer_runner.close()
    runner = Runner(forward, tok, eos_token_ids=[])  # no EOS: always the full length
    gguf = resolved.location.path
    samples: dict[str, list[float]] = {"ours1": [], "ours8": [], "peer1": [], "peer8": []}
    try:
        for _ in range(args.reps):
            samples["ours1"].append(bench_ours(runner, ids, args.tokens, 1))
            if args.llama:
                samples["peer1"].append(llama_batch1(args.llama, gguf, args.tokens))
            samples["ours8"].append(bench_ours(runner, ids, args.tokens, CONCURRENT))
            if args.llama:
                samples["peer8"].append(llama_parallel(args.llama, gguf, len(ids), args.tokens, CONCURRENT))
    finally:
        runner.close()
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    for n, key in ((1, "1"), (CONCURRENT, "8")):
        ours = med[f"ours{key}"]
        peer = med.get(f"peer{key}")
        label = "batch 1" if n == 1 else f"{n} concurrent, aggregate"
        rows.append((f"decode tok/s, {label}", f"{ours:.1f}" + (f" vs llama.cpp {peer:.1f}" if peer else ""),
                     f"{ours / peer:.0%} of llama.cpp" if peer else ""))
    rows.append(("greedy answer", repr(text.strip())[:60], "Paris" if "Paris" in text else "WRONG"))

    kernels = "PyTorch's kernels" if args.torch_kernels else "C block kernels"
    print(f"\n{args.model} on the CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, {kernels}), "
          f"prompt {len(ids)} tokens, {args.tokens} new tokens, greedy, median of {args.reps}, "
          f"torch {torch.__version__}")
    for name, value, note in rows:
        print(f"{name:<56}{value:>28}  {note}")
    print("samples:", {k: [round(x, 1) for x in v] for k, v in samples.items() if v})


if __name__ == "__main__":
    main()
