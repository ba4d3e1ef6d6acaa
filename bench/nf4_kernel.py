"""The NF4 matrix product on Llama-3-8B shapes: hfollama's Triton kernel (launch settings
swept) against bitsandbytes' own 4-bit product and against cuBLAS on bf16, in one run.

    python bench/nf4_kernel.py [--rows 1 8 32] [--out configs.json]

Prints one table: per shape and row count, microseconds and GB/s of the weight bytes (what
decoding must read), and writes the best settings as JSON (kernels.NF4_CONFIGS keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

from daemon.engine.cuda import kernels as K  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMV_SWEEP = [(bn, bk, w, sk, lut) for bn, bk, w, sk in ((32, 256, 4, 4), (64, 512, 4, 4), (32, 512, 4, 1),
                                                       (64, 256, 4, 1), (16, 512, 2, 4), (128, 256, 8, 2))
              for lut in (True, False)]
MMA_SWEEP = [(bn, bk, w) for bn in (64, 128) for bk in (128, 256) for w in (4, 8)]


class _P:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _M:
    def __init__(self, n, k):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        q, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        self.weight, self.bias, self.q, self.st, self.dense = _P(q, st), None, q, st, w


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1000  # µs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    best: dict[str, list] = {}
    rows_out = []
    for name, (n, k) in SHAPES.items():
        mod = _M(n, k)
        w = K.NF4Weights([mod])
        nbytes = w.nbytes
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            path = "gemv" if m <= 4 else "mma"
            sweep = GEMV_SWEEP if path == "gemv" else MMA_SWEEP
            timings = []
            for cfg in sweep:
                if path == "gemv" and (k // cfg[3]) % cfg[1]:
                    continue
                try:
                    timings.append((bench(lambda: K.nf4_matmul(x, w, config=cfg)), cfg))
                except Exception:  # a setting that does not compile or fit
                    continue
            t, cfg = min(timings)
            print(name, m, f"{t:.1f}us", cfg, flush=True)
            best[f"{path},{n},{k}"] = list(cfg)
            t_bnb = bench(lambda: bnb.matmul_4bit(x, mod.q.t(), quant_state=mod.st))
            t_dense = bench(lambda: torch.nn.functional.linear(x, mod.dense))
            rows_out.append((name, m, t, nbytes / t / 1e3, cfg, t_bnb, t_dense, mod.dense.numel() * 2 / t_dense / 1e3))
    print(f"\n{'matrix':<8}{'rows':>5}{'ours µs':>10}{'GB/s':>8}{'  setting':<18}{'bnb µs':>9}{'x':>6}"
          f"{'bf16 µs':>10}{'GB/s':>8}")
    for name, m, t, gbs, cfg, t_bnb, t_dense, gbs_dense in rows_out:
        print(f"{name:<8}{m:>5}{t:>10.1f}{gbs:>8.0f}  {str(cfg):<16}{t_bnb:>9.1f}{t_bnb / t:>6.2f}{t_dense:>10.1f}"
              f"{gbs_dense:>8.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
