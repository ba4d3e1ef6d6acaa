"""Decoding real models' shapes on one GPU: hfollama's path against model.generate(), in one run.

    python bench/gpu_decode.py --root /tmp/bench [--variants nf4-dq nf4 fp4-dq int8 bf16] [--tokens 256]
        [--shapes llama3-8b qwen3-8b gemma3-12b phi4] [--shape-variants nf4-dq] [--cleanup]
        [--ablate no-rope-epilogue no-act-epilogue gemv-trigger]

Shapes (bench/dummy_models.py): Llama-3-8B with every variant, the others with --shape-variants;
each other shape's rate is compared with Llama-3-8B's scaled by the bytes each reads per token
(the "scaled" column: what the same efficiency would give), and --cleanup deletes each other
shape's checkpoint when it is done (the disk holds one at a time).

Per variant: first load (quantizing from bf16 safetensors on local disk, keeping the
quantized weights), model.generate() on that model (greedy, forced to full length: no
EOS), then a second (quantize-once) load into hfollama's engine: decode tokens/s at batch 1
as the daemon reports it (eval_count / eval_duration), time to first token for 128- and
1,024-token prompts, peak GPU memory, and the share of the bandwidth limit (bytes read per
token / measured copy bandwidth). One table at the end; with --ablate, the quantized variants'
decode rate again with one of the step's settings flipped at a time (an epilogue off, the trigger on).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench.dummy_models import SHAPES, write_checkpoint  # noqa: E402
from daemon.backends.runtime import make_forward  # noqa: E402
from daemon.backends.transformers_backend import load_causal_lm  # noqa: E402
from daemon.config import Settings  # noqa: E402
from daemon.engine.params import GenerationRequest, SamplingParams  # noqa: E402
from daemon.engine.runner import Runner  # noqa: E402
from daemon.names import ModelName  # noqa: E402
from daemon.server.app import build_catalog  # noqa: E402
from daemon.store.derived import DerivedCache  # noqa: E402

VARIANTS = {
    "nf4-dq": "{mode: nf4, double_quant: true, compute_dtype: bfloat16}",
    "nf4": "{mode: nf4, double_quant: false, compute_dtype: bfloat16}",
    "fp4-dq": "{mode: fp4, double_quant: true, compute_dtype: bfloat16}",
    "int8": "{mode: int8}",
    "bf16": "{mode: none, compute_dtype: bfloat16}",
}


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del a, b
    return 2 * (1 << 30) / statistics.median(times)


def prompt(n: int) -> list[int]:
    """n token ids below 100,352 (the smallest vocabulary benchmarked, Phi-4's)."""
    return [1000 + (i * 7919) % 99000 for i in range(n)]


def generate_rate(model, n: int) -> float:
    ids = torch.tensor([prompt(128)], device="cuda")

    def run(k: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    return (n - 1) / (run(n) - run(1))


async def _one(runner: Runner, ids: list[int], n: int):
    final = None
    async for chunk in runner.generate(GenerationRequest(tuple(ids), SamplingParams(temperature=0), max_new_tokens=n)):
        if chunk.done:
            final = chunk
    return final


def decode_rate(runner: Runner, n: int) -> float:
    """Median of 3 (after a warm-up) of eval_count / eval_duration, as the daemon reports it."""
    asyncio.run(_one(runner, prompt(128), 8))
    rates = []
    for _ in range(3):
        final = asyncio.run(_one(runner, prompt(128), n))
        rates.append(final.eval_count / (final.eval_duration_ns / 1e9))
    return statistics.median(rates)


def engine_numbers(runner: Runner, n: int) -> dict:
    rate = decode_rate(runner, n)
    ttft = {}
    for plen in (128, 1024):
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            asyncio.run(_one(runner, prompt(plen), 1))
            times.append(time.perf_counter() - t)
        ttft[plen] = statistics.median(times) * 1000
    return {"rate": rate, "ttft128": ttft[128], "ttft1024": ttft[1024]}


def ablations() -> dict:
    """Each of the decode step's optional fusions turned off alone (bench/README: what each is worth)."""
    from daemon.engine.cuda import forward as cuda_forward
    from daemon.engine.cuda import gemv

    return {
        "no-rope-epilogue": lambda: mock.patch.object(cuda_forward.Linear, "fuses_rope", lambda self, rows, d: False),
        "no-act-epilogue": lambda: mock.patch.object(cuda_forward.Linear, "fuses_act", lambda self, rows: False),
        "gemv-trigger": lambda: mock.patch.object(gemv, "GEMV_TRIGGERS_NEXT", True),
    }


def ablated_rates(forward, tokenizer, names: list[str], n: int) -> list[tuple[str, float]]:
    """The decode rate with each ablation, graphs captured again under it."""
    rates = []
    for name in names:
        with ablations()[name]():
            forward._graphs.clear()
            forward.capture_all()
            runner = Runner(forward, tokenizer, [])
            try:
                rates.append((name, decode_rate(runner, n)))
            finally:
                runner.close()
        print(f"  {name}: {rates[-1][1]:.1f} tok/s", flush=True)
    forward._graphs.clear()
    return rates


def profile_step(forward, steps: int = 20) -> str:
    """The kernels of one batch-1 decode step (graph replays), by GPU time: where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.tensor([[1000]])
    for _ in range(3):
        forward.forward(tokens, [0], [130])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward.forward(tokens, [0], [130])
        torch.cuda.synchronize()
    averages = [(getattr(a, "device_time_total", 0) or getattr(a, "cuda_time_total", 0), a.count, a.key[:70])
                for a in prof.key_averages()]
    ranked = sorted(averages, reverse=True)[:14]
    lines = [f"  {total / steps:8.1f} µs/step  {count / steps:5.0f}/step  {name}" for total, count, name in ranked]
    lines.append(f"  {sum(a[0] for a in averages) / steps:8.1f} µs/step in all")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--baseline-tokens", type=int, default=64)
    parser.add_argument("--configs", default="", help="NF4 launch settings from bench/nf4_kernel.py --out")
    parser.add_argument("--profile", action="store_true", help="print each variant's kernels per decode step")
    parser.add_argument("--ablate", nargs="*", default=[], metavar="NAME",
                        help="decode again with one setting flipped at a time: no-rope-epilogue no-act-epilogue gemv-trigger")
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=sorted(SHAPES))
    parser.add_argument("--shape-variants", nargs="+", default=["nf4-dq"], help="the variants of shapes besides Llama")
    parser.add_argument("--cleanup", action="store_true", help="delete each other shape's checkpoint after it")
    args = parser.parse_args()
    if args.configs:
        from daemon.engine.cuda import gemv

        gemv.load_configs(Path(args.configs).read_text())
    root = Path(args.root)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows, ablated = [], []
    for shape in args.shapes:
        checkpoint = write_checkpoint(root / f"{shape}-random", shape=shape)
        variants = args.variants if shape == "llama3-8b" else args.shape_variants
        mf = root / "modelfiles"
        mf.mkdir(parents=True, exist_ok=True)
        (mf / "bench.yaml").write_text("tags:\n" + "".join(
            f"  {shape}-{v}:\n    source: {{path: '{checkpoint}'}}\n    quantization: {VARIANTS[v]}\n" for v in variants))
        settings = Settings.from_env({}, models_dir=root / "store", user_modelfiles_dir=mf, device="cuda")
        catalog = build_catalog(settings)
        derived = DerivedCache(root / "store" / "derived")
        for variant in variants:
            rows.append(bench_variant(catalog, derived, shape, variant, args, bandwidth, ablated))
        if args.cleanup and shape != "llama3-8b":
            import shutil

            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(root / "store" / "derived", ignore_errors=True)
    print(f"\nrandom weights, prompt 128, {args.tokens} new tokens, greedy, batch 1, {torch.cuda.get_device_name()}")
    print(f"{'shape':<14}{'variant':<8}{'path':<13}{'tok/s':>8}{'generate()':>11}{'ratio':>7}{'TTFT128':>9}"
          f"{'TTFT1024':>10}{'peak GiB':>9}{'load 1st':>9}{'load 2nd':>9}{'GB/tok':>7}{'% BW':>6}{'scaled':>8}{'vs':>6}{'x llama':>8}")
    llama = {r["variant"]: r for r in rows if r["shape"] == "llama3-8b"}
    for r in rows:
        ref = llama.get(r["variant"])
        scaled = ref["rate"] * ref["bytes"] / r["bytes"] if ref else float("nan")
        print(f"{r['shape']:<14}{r['variant']:<8}{r['path']:<13}{r['rate']:>8.1f}{r['base']:>11.1f}"
              f"{r['rate'] / r['base']:>6.1f}x{r['ttft128']:>8.0f}ms{r['ttft1024']:>8.0f}ms{r['peak']:>9.1f}"
              f"{r['first_load']:>8.1f}s{r['second_load']:>8.1f}s{r['bytes'] / 1e9:>7.2f}{r['pct']:>5.0f}%"
              f"{scaled:>8.1f}{100 * r['rate'] / scaled:>5.0f}%{r['rate'] / ref['rate'] if ref else float('nan'):>7.2f}x")
    for v, full, rates in ablated:
        print(f"{v}: {full:.1f} tok/s with every fusion; " + ", ".join(f"{name} {r:.1f}" for name, r in rates))


def bench_variant(catalog, derived, shape: str, variant: str, args, bandwidth: float, ablated: list) -> dict:
    resolved = catalog.resolve(ModelName.parse(f"bench:{shape}-{variant}"))
    t = time.perf_counter()
    loaded = load_causal_lm(resolved, torch.device("cuda"), derived)
    first_load = time.perf_counter() - t
    base = generate_rate(loaded.model, args.baseline_tokens if shape == "llama3-8b" else 16)
    print(f"{shape} {variant}: first load {first_load:.1f}s, generate() {base:.1f} tok/s", flush=True)
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    t = time.perf_counter()
    loaded = load_causal_lm(resolved, torch.device("cuda"), derived)
    second_load = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    forward = make_forward(loaded.model, slots=4, num_ctx=4096)
    runner = Runner(forward, loaded.tokenizer, [])  # no EOS: full length
    try:
        numbers = engine_numbers(runner, args.tokens)
    finally:
        runner.close()
    peak = torch.cuda.max_memory_allocated() / (1 << 30)
    if args.profile:
        print(f"{shape} {variant}: kernels per decode step (batch 1)\n{profile_step(forward)}", flush=True)
    if args.ablate and shape == "llama3-8b" and hasattr(forward, "capture_all") and forward.layers[0].qkv.quantized:
        print(f"{variant}: {numbers['rate']:.1f} tok/s with every fusion; each off alone:", flush=True)
        ablated.append((variant, numbers["rate"], ablated_rates(forward, loaded.tokenizer, args.ablate, args.tokens)))
    per_token = forward.weights_bytes - forward.embed.numel() * forward.embed.element_size()
    for layer in getattr(forward, "layers", ()):  # a token reads top_k of a MoE layer's experts
        experts = getattr(layer, "experts", None)
        if experts is not None:
            per_token -= int(experts.nbytes * (1 - experts.spec.top_k / experts.count))
    row = dict(shape=shape, variant=variant, path=forward.path, rate=numbers["rate"], base=base,
               ttft128=numbers["ttft128"], ttft1024=numbers["ttft1024"], peak=peak, first_load=first_load,
               second_load=second_load, bytes=per_token, pct=100 * numbers["rate"] / (bandwidth / per_token))
    print(row, flush=True)
    del forward, runner, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    main()
