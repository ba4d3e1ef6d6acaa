"""What a prompt pass of a never-seen length costs the first time, and how a pass's prompt
segments attend, on the GPU (Llama-3-8B shapes, bf16, random values):

    python bench/prompt_shapes.py [--lengths 40]

1. `products`: each of the 8B model's matrix products (F.linear, bf16 weights: what a prefill
   multiplies by, the bf16 copy or the scratch a 4-bit matrix is dequantized into) at row
   counts never seen before in this process, first call against second, then again at new
   row counts after a warm sweep of row counts (each multiple of --step up to 2,048): whether
   cuBLAS's first use of a row count costs (lazy kernel loading) and whether a sweep covers it.
2. `segments`: the follower pass of 32 prompts sharing a 2,000-token system prompt (19 prompts
   of 104 tokens from position 2,010) attended per segment, together (attention.PromptSegments)
   and in variants of that call (K/V contiguous, expanded for GQA, without the mask), beside
   one prompt of 2,048 tokens, in ms per layer, per SDPA backend.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from daemon.engine.attention import PromptSegments, attend  # noqa: E402

PRODUCTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
            "lm_head": (128256, 4096)}
HEADS, KV_HEADS, DIM = 32, 8, 128


def ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t)


def products(lengths: int, step: int) -> None:
    weights = {name: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for name, (n, k) in PRODUCTS.items()}
    inputs = {k: torch.randn(2048, k, dtype=torch.bfloat16, device="cuda") for _, k in PRODUCTS.values()}
    print(f"the process's first product (cuBLAS's start): {ms(lambda: F.linear(inputs[4096][:512], weights['qkv'])):.1f} ms")
    rng = random.Random(0)
    seen: set[int] = {512}

    def fresh(count: int) -> list[int]:
        out = []
        while len(out) < count:
            m = rng.randrange(1, 2049)
            if m not in seen:
                seen.add(m)
                out.append(m)
        return out

    def table(title: str, rows: list[int]) -> None:
        print(f"\n{title}: ms for all five products, first call / second call")
        excess = []
        for m in sorted(rows):
            first = sum(ms(lambda: F.linear(inputs[w.shape[1]][:m], w)) for w in weights.values())
            second = sum(ms(lambda: F.linear(inputs[w.shape[1]][:m], w)) for w in weights.values())
            excess.append(first - second)
            print(f"  {m:>5} rows  {first:7.2f} / {second:7.2f}")
        print(f"  first-call excess: median {statistics.median(excess):.2f} ms, max {max(excess):.2f} ms")

    table("row counts never seen", fresh(lengths))
    t = time.perf_counter()
    for m in range(step, 2049, step):
        for w in weights.values():
            F.linear(inputs[w.shape[1]][:m], w)
        seen.add(m)
    torch.cuda.synchronize()
    print(f"\nwarm sweep of {2048 // step} row counts (multiples of {step}): {time.perf_counter() - t:.2f} s")
    table("new row counts after the sweep", fresh(lengths))


def segments() -> None:
    slots, ctx = 33, 4096
    k_cache = torch.randn(slots, KV_HEADS, ctx, DIM, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    follower = [(slot, 2010, 104) for slot in range(1, 20)]
    scale = DIM ** -0.5
    print("\nattention of one prompt pass, ms per layer (32 heads x 128, 8 KV heads, bf16): 19 prompts of 104 "
          "tokens from position 2,010, and one prompt of 2,048")
    q19 = torch.randn(19 * 104, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    q1 = torch.randn(2048, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    batched_q = q19.view(19, 104, HEADS, DIM).transpose(1, 2)
    keys, values = k_cache[1:20, :, :2114], v_cache[1:20, :, :2114]
    expand = lambda t: t.repeat_interleave(HEADS // KV_HEADS, dim=1)  # noqa: E731
    bias = torch.nn.attention.bias.causal_lower_right(104, 2114)

    def per_segment() -> None:
        for i, (slot, start, n) in enumerate(follower):
            attend(q19[i * n:(i + 1) * n].transpose(0, 1)[None], k_cache[slot:slot + 1, :, :start + n],
                   v_cache[slot:slot + 1, :, :start + n], None, scale=scale)
    cases = {
        "19, per segment": per_segment,
        "19, together (PromptSegments)": lambda: PromptSegments(follower, q19.device).attend(
            q19, k_cache, v_cache, scale=scale),
        "19, batched, GQA": lambda: F.scaled_dot_product_attention(batched_q, keys, values, attn_mask=bias,
                                                                   scale=scale, enable_gqa=True),
        "19, batched, K/V contiguous": lambda: F.scaled_dot_product_attention(
            batched_q.contiguous(), keys.contiguous(), values.contiguous(), attn_mask=bias, scale=scale,
            enable_gqa=True),
        "19, batched, K/V expanded": lambda: F.scaled_dot_product_attention(
            batched_q, expand(keys), expand(values), attn_mask=bias, scale=scale),
        "19, batched, is_causal=False": lambda: F.scaled_dot_product_attention(batched_q, keys, values, scale=scale,
                                                                               enable_gqa=True),
        "2,048, GQA": lambda: F.scaled_dot_product_attention(q1.transpose(0, 1)[None], k_cache[:1, :, :2048],
                                                             v_cache[:1, :, :2048], is_causal=True, scale=scale,
                                                             enable_gqa=True),
        "2,048, K/V expanded": lambda: F.scaled_dot_product_attention(
            q1.transpose(0, 1)[None], expand(k_cache[:1, :, :2048]), expand(v_cache[:1, :, :2048]), is_causal=True,
            scale=scale),
    }
    for label, run in cases.items():
        for name, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                               ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
            try:
                with sdpa_kernel(backends):
                    run()
                    times = sorted(ms(run) for _ in range(20))
                print(f"  {label:<32} {name:<10}{times[10]:8.3f}")
            except RuntimeError as exc:
                print(f"  {label:<32} {name:<10} fails: {str(exc).splitlines()[0][:70]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, default=40)
    parser.add_argument("--step", type=int, default=64)
    parser.add_argument("--only", choices=["products", "segments"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(default)')}")
    if args.only != "segments":
        products(args.lengths, args.step)
    if args.only != "products":
        segments()


if __name__ == "__main__":
    main()
