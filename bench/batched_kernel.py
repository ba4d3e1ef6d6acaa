"""The batched 4-bit and int8 products (daemon/engine/cuda/batched.py) on Llama-3-8B's matrices at
1-64 rows, against the GEMV (1-4 rows), bitsandbytes' 4-bit product, the dequantize-to-scratch
GEMM they replace, and cuBLAS on a bf16 copy, in one run.

    python bench/batched_kernel.py [--rows 1 2 4 8 16 32 64] [--out configs.json] [--jobs 12]
    python bench/batched_kernel.py --settled --rows 1 2 4 8 16 32 64 128 256 512

`--settled` times the settings checked in (gemv.GEMV_CONFIGS) without a sweep: the table the
forward pass's choice by row count (forward.GEMV_ROWS, batched.MAX_ROWS) rests on; past 64 rows
the batched product runs tiles of 64 rows side by side.

Settings are swept per matrix and tile height (BLOCK_M 16 / 32 / 64, timed at the most rows the
tile takes), each checked against bitsandbytes' dequantize-then-matmul before it is timed; their
kernels are compiled first by `--jobs` processes at once (Triton's disk cache is shared).
Timings are CUDA-graph replays over copies of the matrix that overflow the L2 cache (as in a
decode step), median. Prints µs per matrix (and GB/s of the quantized bytes), the 32-layer sum
per row count, and writes the best settings (gemv.GEMV_CONFIGS "mm" / "mm8" keys) as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from bench.nf4_kernel import L2_BYTES, SHAPES, graph_time, rel  # noqa: E402

# (BLOCK_N, BLOCK_K, warps, split-K, stages)
NF4_SWEEP = [(bn, bk, w, sk, st) for bn, bk, w, sk, st in itertools.product((32, 64, 128), (128, 256), (4, 8),
                                                                          (1, 2, 4), (1, 3))
             if w == 4 or bn == 128]
INT8_SWEEP = [(bn, bk, 4, sk, 3) for bn, bk, sk in itertools.product((64, 128), (64, 128), (1, 2, 4))]
TILES = (16, 32, 64)


def quick_time(fn, copies: int) -> float:
    """graph_time with fewer replays, for the sweep."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000 / copies


def _nf4(n: int, k: int):
    import bitsandbytes.functional as BF

    from daemon.engine.cuda import gemv as G

    class P:
        def __init__(self, data, state):
            self.data, self.quant_state = data, state

    class M:
        def __init__(self):
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            q, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            self.weight, self.bias, self.q, self.st = P(q, st), None, q, st

    mod = M()
    return mod, G.NF4Weights([mod])


def _int8(n: int, k: int):
    import bitsandbytes.functional as BF

    from daemon.engine.cuda import gemv as G

    w = torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
    cb, scb, _ = BF.int8_vectorwise_quant(w)

    class M:
        weight = torch.nn.Parameter(cb, requires_grad=False)
        bias = None

    M.weight.SCB = scb
    return M, G.Int8Weights([M])


def _compile(job: tuple) -> str:
    """Runs one setting once on a small matrix with the same specializations (a worker process)."""
    kind, tile, config = job
    from daemon.engine.cuda import batched as B

    try:
        _, w = (_nf4 if kind == "nf4" else _int8)(1024, 4096)
        B.matmul(torch.zeros(tile, 4096, dtype=torch.bfloat16, device="cuda"), w, config=config)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # reported, and the timing run skips it
        return f"{kind} {tile} {config}: {type(exc).__name__}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--out", default="")
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--settled", action="store_true", help="time the checked-in settings, no sweep")
    args = parser.parse_args()
    import bitsandbytes as bnb

    from daemon.engine.cuda import batched as B
    from daemon.engine.cuda import gemv as G

    jobs = [(kind, tile, cfg) for tile in TILES for kind, sweep in (("nf4", NF4_SWEEP), ("int8", INT8_SWEEP))
            for cfg in sweep]
    if not args.settled:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            failed = [f for f in pool.map(_compile, jobs) if f]
        print(f"compiled {len(jobs) - len(failed)} of {len(jobs)} settings", *failed, sep="\n  ", flush=True)

    best: dict[str, list] = {}
    table: list[tuple] = []  # (kind, matrix, rows, ours µs, GB/s, setting, bnb µs, scratch µs, bf16 µs)
    for kind, name in itertools.product(("nf4", "int8"), SHAPES):
        n, k = SHAPES[name]
        make = _nf4 if kind == "nf4" else _int8
        copies = max(2, -(-2 * L2_BYTES // (n * k // (2 if kind == "nf4" else 1))))
        made = [make(n, k) for _ in range(copies)]
        mods, ws = [m for m, _ in made], [w for _, w in made]
        ref_w = (G.nf4_dequantize(ws[0], torch.empty(n * k, dtype=torch.bfloat16, device="cuda")) if kind == "nf4"
                 else (ws[0].packed.view(n, k).float() * ws[0].scale[:, None]).to(torch.bfloat16))
        dense = [ref_w.clone() for _ in range(2)]
        scratch = torch.empty(n * k, dtype=torch.bfloat16, device="cuda")
        chosen: dict[int, tuple] = {}
        for tile in () if args.settled else TILES:
            x = torch.randn(tile, k, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ ref_w.float().T
            timings = []
            for cfg in NF4_SWEEP if kind == "nf4" else INT8_SWEEP:
                try:
                    err = rel(B.matmul(x, ws[0], config=cfg), ref)
                    if not err < 1e-2:
                        print(f"  {kind} {name} {tile} {cfg}: error {err:.1e}", flush=True)
                        continue
                    timings.append((quick_time(lambda: [B.matmul(x, w, config=cfg) for w in ws], len(ws)), cfg))
                except Exception as exc:
                    print(f"  {kind} {name} {tile} {cfg}: {type(exc).__name__}", flush=True)
            timings.sort()
            print(f"{kind} {name} tile {tile}:", [(round(t, 1), c) for t, c in timings[:4]], flush=True)
            if timings:
                chosen[tile] = timings[0][1]
                best[f"{'mm' if kind == 'nf4' else 'mm8'},{n},{k},{tile}"] = list(timings[0][1])
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cfg = B.setting(ws[0], m) if args.settled else chosen.get(B.block_m(m))
            ours = graph_time(lambda: [B.matmul(x, w, config=cfg) for w in ws], len(ws)) if cfg else float("nan")
            if cfg and not rel(B.matmul(x, ws[0], config=cfg), x.float() @ ref_w.float().T) < 1e-2:
                print(f"  {kind} {name} {m} rows {cfg}: wrong result", flush=True)
                ours = float("nan")
            gemv = graph_time(lambda: [w.matmul(x) for w in ws], len(ws)) if m <= 4 else float("nan")
            bnb_t = (graph_time(lambda: [bnb.matmul_4bit(x, mod.q.t(), quant_state=mod.st) for mod in mods], len(mods))
                     if kind == "nf4" else float("nan"))
            scratch_t = graph_time(lambda: [torch.nn.functional.linear(x, w.dequantize(scratch)) for w in ws], len(ws))
            dense_t = graph_time(lambda: [torch.nn.functional.linear(x, d) for d in dense], 2)
            table.append((kind, name, m, ours, ws[0].nbytes / ours / 1e3, cfg, gemv, bnb_t, scratch_t, dense_t))
        del made, mods, ws, dense, scratch, ref_w
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}; µs per matrix (GB/s of the quantized bytes); GEMV at 1-4 rows, "
          "bitsandbytes' 4-bit product, dequantize-to-scratch + cuBLAS, cuBLAS on a bf16 copy")
    print(f"{'kind':<5}{'matrix':<9}{'rows':>5}{'batched':>9}{'GB/s':>7}{'GEMV':>8}{'bnb':>8}{'scratch':>9}"
          f"{'bf16':>8}  setting")
    for kind, name, m, ours, gbs, cfg, gemv, bnb_t, scratch_t, dense_t in table:
        print(f"{kind:<5}{name:<9}{m:>5}{ours:>9.1f}{gbs:>7.0f}{gemv:>8.1f}{bnb_t:>8.1f}{scratch_t:>9.1f}"
              f"{dense_t:>8.1f}  {cfg}")
    print("\n32 layers (qkv + o + gate_up + down), ms per step:")
    for kind, m in itertools.product(("nf4", "int8"), args.rows):
        mine = [r for r in table if r[0] == kind and r[2] == m]
        sums = [sum(r[i] for r in mine) * 32 / 1000 for i in (3, 6, 7, 8, 9)]
        print(f"  {kind} rows {m:>3}: batched {sums[0]:.2f}, GEMV {sums[1]:.2f}, bitsandbytes {sums[2]:.2f}, "
              f"scratch {sums[3]:.2f}, bf16 copy {sums[4]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
