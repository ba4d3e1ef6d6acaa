"""The NF4 matrix product on Llama-3-8B shapes: hfollama's Triton kernels (launch settings
swept) against bitsandbytes' own 4-bit product and cuBLAS on bf16, in one run.

    python bench/nf4_kernel.py [--rows 1 2 4] [--int8] [--models llama3-8b qwen3-8b gemma3-12b phi4]
        [--model-rows 1] [--routed qwen3-30b-a3b gpt-oss-20b] [--moe-layer qwen3-30b-a3b] [--out configs.json]

--routed sweeps a MoE layer's expert GEMVs (engine/cuda/moe.py) at 1 and 8 tokens: its rows
show the pair count, and in the bitsandbytes column the checked-in setting's time (before any
routed sweep, that of the dense matrix of the expert's shape). --moe-layer times a whole MoE
layer's experts at 1-64 tokens with the routed GEMVs and with the grouped product.

Each timing is a CUDA graph over several distinct copies of the matrix (more bytes than the
L2 cache holds, as in a decode step where every layer's weights are new), median of the
replays, divided by the copies. Every setting is checked against bitsandbytes'
dequantize-then-matmul before it is timed. Prints one table (per matrix and row count: µs,
GB/s of the weight bytes, the best setting, the baselines) and the summed time of a 32-layer
stack at each row count; writes the best settings as JSON (gemv.GEMV_CONFIGS keys).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

from daemon.engine.cuda import gemv as G  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# the fused products (N, K) of the other benchmarked models (bench/dummy_models.py), those that
# differ from Llama-3-8B's: Qwen3-8B shares its q/k/v and o
MODEL_SHAPES = {
    "qwen3-8b": {"gate_up": (24576, 4096), "down": (4096, 12288)},
    "gemma3-12b": {"qkv": (8192, 3840), "o": (3840, 4096), "gate_up": (30720, 3840), "down": (3840, 15360)},
    "phi4": {"qkv": (7680, 5120), "o": (5120, 5120), "gate_up": (35840, 5120), "down": (5120, 17920)},
}
# (BLOCK_N, BLOCK_K, warps, split-K, x as vectors, packed bf16, prefetch): a warp reads BLOCK_K / 2
# contiguous bytes of one row at a time; more rows per program reuse each x load for several rows
GEMV_SWEEP = [(bn, bk, w, sk, True, True, True)
              for bn, bk, w, sk in itertools.product((16, 32, 64), (512, 1024, 2048), (4, 8), (1, 2, 4, 8))
              if 32 <= bn * bk // (32 * w) <= 256 and bk * sk <= 4096]
GEMV_SWEEP += [(64, 128, 2, 4, True, False, False), (32, 256, 8, 4, False, False, False)]  # the fp32 path
# the int8 GEMV: (BLOCK_N, BLOCK_K, warps, split-K)
INT8_SWEEP = [(bn, bk, w, sk) for bn, bk, w, sk in itertools.product((16, 32), (512, 1024), (4, 8), (1, 2))
              if 16 <= bn * bk // (128 * w) <= 128]
L2_BYTES = 50 << 20
# the MoE models' routed products (engine/cuda/moe.py): (experts, top k, hidden, expert intermediate)
ROUTED_MODELS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "gpt-oss-20b": (32, 4, 2880, 2880),
                 "mixtral-8x7b": (8, 2, 4096, 14336)}


class _P:
    def __init__(self, data, state):
        self.data, self.quant_state = data, state


class _M:
    def __init__(self, n, k):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        q, st = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        self.weight, self.bias, self.q, self.st, self.dense = _P(q, st), None, q, st, w


def graph_time(fn, copies: int) -> float:
    """µs per call: fn runs every copy once; CUDA graph replays, median."""
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1000 / copies


def event_time(fn, copies: int) -> float:
    """µs per call, for code a CUDA graph cannot capture: fn runs every copy once, eagerly
    (launch costs included), median."""
    return triton.testing.do_bench(fn, rep=60, return_mode="median") * 1000 / copies


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# µs per layer of the kernel a split-K setting leaves apart on these matrices, since an epilogue
# needs every sum in one program (the RoPE and SiLU kernels' share of a bf16 decode step on an
# H200, 2026-12-01): a split-K setting is chosen there only when it wins by more
UNFUSED_US = {"qkv": 1.8, "gate_up": 1.5}


def rank(label, x, ws, ref, candidates, unfused_us: float = 0.0):
    """(µs, setting, error) of each setting that matches the reference, fastest first, split-K
    settings counted with the unfused kernel's µs."""
    timings = []
    for cfg in candidates:
        try:
            err = rel(ws[0].matmul(x, config=cfg), ref)
            if not err < 1e-2:
                print(f"  {label} {cfg}: error {err:.2e}, skipped", flush=True)
                continue
            t = graph_time(lambda: [w.matmul(x, config=cfg) for w in ws], len(ws))
        except Exception as exc:  # a setting that does not compile or fit
            print(f"  {label} {cfg}: {type(exc).__name__}", flush=True)
            continue
        timings.append((t, cfg, err))
    timings.sort(key=lambda timing: timing[0] + (unfused_us if timing[1][3] > 1 else 0.0))
    print(f"{label} best:", [(round(t, 1), c) for t, c, _ in timings[:4]], flush=True)
    return timings


def sweep(name, mods, ws, m, k, rows_out, best, candidates):
    n = ws[0].n
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ BF.dequantize_4bit(mods[0].q, mods[0].st).float().T
    timings = rank(f"{name} m={m}", x, ws, ref, candidates, UNFUSED_US.get(name.split()[-1], 0.0))
    if not timings:
        return []
    t, cfg, err = timings[0]
    best[f"gemv,{n},{k}" + ("" if m == 1 else f",{m}")] = list(cfg)
    t_bnb = graph_time(lambda: [bnb.matmul_4bit(x, mod.q.t(), quant_state=mod.st) for mod in mods], len(mods))
    t_dense = graph_time(lambda: [torch.nn.functional.linear(x, mod.dense) for mod in mods[:2]], 2)
    rows_out.append((name, m, t, ws[0].nbytes / t / 1e3, cfg, err, t_bnb, t_dense))
    return [c for _, c, _ in timings]


def sweep_int8(rows_out, best, rows: list[int]) -> None:
    """The int8 GEMV's settings per matrix and row count, against bitsandbytes' own int8 product
    (LLM.int8(), threshold 6) on the same weights."""
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-2 * L2_BYTES // (n * k)))
        dense = [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02 for _ in range(copies)]
        mods = []
        for w in dense:
            cb, scb, _ = BF.int8_vectorwise_quant(w)
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
            mods.append(layer.cuda())
        ws = [G.Int8Weights([mod]) for mod in mods]
        del dense
        ranked = INT8_SWEEP
        for m in rows:  # 2-4 rows: the six best settings for one row
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ BF.int8_vectorwise_dequant(ws[0].packed.view(n, k), ws[0].scale * 127).T
            timings = rank(f"int8 {name} m={m}", x, ws, ref, ranked if m == rows[0] else ranked[:6],
                           UNFUSED_US.get(name, 0.0))
            if not timings:
                continue
            if m == rows[0]:
                ranked = [c for _, c, _ in timings]
            t, cfg, err = timings[0]
            best[f"int8,{n},{k}" + ("" if m == 1 else f",{m}")] = list(cfg)
            half = x.half()
            try:  # LLM.int8() finds its outliers on the host, so it cannot be graph-captured
                t_bnb = event_time(lambda: [mod(half) for mod in mods], len(mods))
            except Exception as exc:  # the baseline only: the sweep stands without it
                print(f"  int8 {name}: bitsandbytes' product not timed ({type(exc).__name__}: {exc})", flush=True)
                t_bnb = float("nan")
            rows_out.append((f"i8 {name}", m, t, ws[0].nbytes / t / 1e3, cfg, err, t_bnb, float("nan")))
        mods = ws = None  # this shape's copies go before the next one's
        torch.cuda.empty_cache()


def _effective(settings: list[tuple], k: int) -> list[tuple]:
    """The settings that differ on a K (nf4_matmul fits BLOCK_K and split-K to it: on gpt-oss's
    2,880 most collapse into a few)."""
    seen, kept = set(), []
    for cfg in settings:
        split = G._gemv_split(cfg[3], k, 64)
        key = (cfg[0], G._fit_block_k(cfg[1], k // split, 64), cfg[2], split, *cfg[4:])
        if key not in seen:
            seen.add(key)
            kept.append(cfg)
    return kept


def sweep_routed(rows_out, best, models: list[str], tokens: list[int]) -> None:
    """A MoE layer's routed GEMVs (one program column per (token, expert) pair), per model and
    token count: [gate; up] (every pair of a token reads its row) and down (a row per pair),
    over one layer's stacked 4-bit experts as moe.py quantizes them, against the same pairs'
    products on the dequantized stack. Each timed call routes to other experts (disjoint sets
    while they last), so that their weights come from memory as in a decode step."""
    from daemon.engine.cuda.moe import _quantized

    candidates: dict[str, list] = {}
    for model in models:
        count, top_k, hidden, inter = ROUTED_MODELS[model]
        for name, n, k, per_x in (("gate_up", 2 * inter, hidden, top_k), ("down", hidden, inter, 1)):
            stack = torch.randn(count, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            w = _quantized(stack, "nf4", True)
            del stack
            dense = w.dequantize(torch.empty(w.n * w.k, dtype=torch.bfloat16, device="cuda")).view(count, n, k)
            gen = torch.Generator(device="cpu").manual_seed(n + k)
            for m in tokens:
                pairs = m * top_k
                calls = max(2, -(-2 * L2_BYTES // (pairs * n * k // 2)))
                order = torch.cat([torch.randperm(count, generator=gen) for _ in range(-(-calls * pairs // count) + 1)])
                routes = [G.Routed(order[c * pairs:(c + 1) * pairs].to(torch.int32).cuda(), n, per_x)
                          for c in range(calls)]
                x = torch.randn(pairs // per_x, k, dtype=torch.bfloat16, device="cuda")
                chosen = routes[0].experts.long()
                rows = torch.arange(pairs, device="cuda") // per_x
                ref = torch.bmm(x[rows].float()[:, None], dense[chosen].float().transpose(1, 2))[:, 0]
                label = f"{model.split('-')[0]} {name} p={pairs}"
                timings = []
                for cfg in candidates[name] if m != tokens[0] else _effective(GEMV_SWEEP, k):
                    try:
                        err = rel(w.matmul(x, config=cfg, routed=routes[0]), ref)
                        if not err < 1e-2:
                            print(f"  {label} {cfg}: error {err:.2e}, skipped", flush=True)
                            continue
                        t = graph_time(lambda: [w.matmul(x, config=cfg, routed=r) for r in routes], len(routes))
                    except Exception as exc:  # a setting that does not compile or fit
                        print(f"  {label} {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    timings.append((t, cfg, err))
                unfused = UNFUSED_US["gate_up"] if name == "gate_up" else 0.0
                timings.sort(key=lambda timing: timing[0] + (unfused if timing[1][3] > 1 else 0.0))
                if not timings:
                    continue
                print(f"{label} best:", [(round(t, 1), c) for t, c, _ in timings[:4]], flush=True)
                if m == tokens[0]:  # more tokens: the six best settings for the first count
                    candidates[name] = [c for _, c, _ in timings[:6]]
                t, cfg, err = timings[0]
                # the checked-in setting (before any routed sweep: the dense matrix's of this shape)
                t_old = graph_time(lambda: [w.matmul(x, routed=r) for r in routes], len(routes))
                best[f"routed,{n},{k},{pairs}"] = list(cfg)
                nbytes = w.nbytes * pairs / count
                rows_out.append((label, m, t, nbytes / t / 1e3, cfg, err, t_old, float("nan")))
            del w, dense
            torch.cuda.empty_cache()


def compare_moe_layer(models: list[str], tokens: list[int]) -> None:
    """One MoE layer's experts (moe.RoutedExperts on random NF4 + double-quant experts: the
    router, the products, the weighted sum) at each token count, the routed GEMVs against the
    grouped product (the pairs sorted into per-expert tiles), every timed call on other rows
    (other experts, from memory); prints the table and where the grouped product starts to win
    (moe.GROUPED_PAIRS_PER_EXPERT)."""
    from types import SimpleNamespace

    from daemon.engine.cuda import moe
    from daemon.engine.spec import Experts, ExpertWeights

    print(f"\n{torch.cuda.get_device_name()}; one MoE layer's experts, µs per call (graph replays)")
    print(f"{'model':<16}{'tokens':>7}{'pairs':>7}{'routed':>9}{'grouped':>9}{'grouped/routed':>16}")
    for model in models:
        count, top_k, hidden, inter = ROUTED_MODELS[model]
        spec = SimpleNamespace(activation="silu", experts=Experts(
            count=count, top_k=top_k, normalize=True, route_in_fp32=False, shared=False, softmax_after_topk=False,
            interleaved=False, sparse=()))
        stacks = ExpertWeights(torch.randn(count, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda") * 0.02,
                               torch.randn(count, hidden, inter, dtype=torch.bfloat16, device="cuda") * 0.02)
        router = torch.randn(count, hidden, dtype=torch.bfloat16, device="cuda")
        layer = moe.RoutedExperts(router, None, stacks, spec, torch.bfloat16, ("nf4", True))
        del stacks
        torch.cuda.empty_cache()
        expert_bytes = layer.nbytes / count
        first_win, setting = None, moe.GROUPED_PAIRS_PER_EXPERT
        for m in tokens:
            calls = max(2, -(-2 * L2_BYTES // int(min(m * top_k, count) * expert_bytes)))
            hs = [torch.randn(m, hidden, dtype=torch.bfloat16, device="cuda") for _ in range(calls)]
            times = {}
            outs = {}
            for mode, share in (("routed", float("inf")), ("grouped", 0.0)):
                moe.GROUPED_PAIRS_PER_EXPERT = share
                outs[mode] = layer(hs[0]).total()
                times[mode] = graph_time(lambda: [layer(h).total() for h in hs], calls)
            moe.GROUPED_PAIRS_PER_EXPERT = setting
            err = rel(outs["grouped"], outs["routed"])
            assert err < 1e-2, f"{model} {m} tokens: grouped against routed {err:.2e}"
            ratio = times["grouped"] / times["routed"]
            if ratio < 1 and first_win is None:
                first_win = m * top_k / count
            print(f"{model:<16}{m:>7}{m * top_k:>7} {times['routed']:>9.1f} {times['grouped']:>9.1f}{ratio:>16.2f}",
                  flush=True)
        print(f"{model}: the grouped product first wins at {first_win} pairs per expert")
        del layer
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--out", default="")
    parser.add_argument("--int8", action="store_true", help="also sweep the int8 GEMV (against LLM.int8())")
    parser.add_argument("--models", nargs="+", default=["llama3-8b"], choices=["llama3-8b", "none", *MODEL_SHAPES])
    parser.add_argument("--model-rows", type=int, nargs="+", default=[1], help="rows swept for the other models")
    parser.add_argument("--routed", nargs="*", default=[], choices=list(ROUTED_MODELS),
                        help="also sweep these MoE models' routed expert GEMVs (only them with --models none)")
    parser.add_argument("--routed-tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--moe-layer", nargs="*", default=[], choices=list(ROUTED_MODELS),
                        help="time these MoE models' expert layers, routed GEMVs against the grouped product")
    parser.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args()
    best: dict[str, list] = {}
    rows_out: list[tuple] = []
    products = [(name, n, k, args.rows) for name, (n, k) in SHAPES.items()] if "llama3-8b" in args.models else []
    for model in args.models:
        products += [(f"{model.split('-')[0]} {name}", n, k, args.model_rows)
                     for name, (n, k) in MODEL_SHAPES.get(model, {}).items()]
    for name, n, k, rows in products:
        base = _M(n, k)
        copies = max(2, -(-2 * L2_BYTES // (n * k // 2)))
        mods = [base] + [_M(n, k) for _ in range(copies - 1)]
        ws = [G.NF4Weights([mod]) for mod in mods]
        for mod in mods[2:]:
            mod.dense = None  # two dense copies are enough to leave the L2 cache
        ranked = GEMV_SWEEP
        for m in rows:  # 2-4 rows: the six best settings for one row
            found = sweep(name, mods, ws, m, k, rows_out, best, GEMV_SWEEP if m == 1 else ranked[:6])
            ranked = found if m == 1 else ranked
        del mods, ws, base
        torch.cuda.empty_cache()
    if args.int8:
        sweep_int8(rows_out, best, args.rows)
    if args.routed:
        sweep_routed(rows_out, best, args.routed, args.routed_tokens)
    if args.moe_layer:
        compare_moe_layer(args.moe_layer, args.moe_tokens)
    print(f"\n{torch.cuda.get_device_name()}; µs per matrix, GB/s of the NF4 bytes (packed + absmax)")
    print(f"{'matrix':<22}{'rows':>5}{'ours µs':>9}{'GB/s':>7}  {'setting':<36}{'err':>8}{'bnb µs':>9}{'bnb/ours':>9}"
          f"{'bf16 µs':>9}")
    for name, m, t, gbs, cfg, err, t_bnb, t_dense in rows_out:
        print(f"{name:<22}{m:>5}{t:>9.1f}{gbs:>7.0f}  {str(tuple(cfg)):<36}{err:>8.1e}{t_bnb:>9.1f}{t_bnb / t:>9.2f}"
              f"{t_dense:>9.1f}")
    print("\nLlama-3-8B's 32 layers (qkv + o + gate_up + down), ms per decode step:")
    for m in args.rows:
        for prefix, label in (("", "NF4"), ("i8 ", "int8")):
            mine = [r for r in rows_out if r[1] == m and r[0].startswith("i8 ") == bool(prefix) and r[0] in
                    (*SHAPES, *(f"i8 {s}" for s in SHAPES))]
            if not mine:
                continue
            ours = sum(r[2] for r in mine) * 32 / 1000
            bnb_ = sum(r[6] for r in mine) * 32 / 1000
            dense = sum(r[7] for r in mine) * 32 / 1000
            print(f"  {label} rows {m:>2}: ours {ours:.2f} ms, bitsandbytes {bnb_:.2f} ms, bf16 cuBLAS {dense:.2f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
