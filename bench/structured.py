"""Decode speed with and without a JSON schema, on the same loaded model, in one run. Prints
one table.

    python bench/structured.py                      # CPU: smollm2:135m (the embedded model)
    python bench/structured.py --gpu --tokenizer T  # GPU: Llama-3-8B shapes, random weights, NF4

Both runs generate the full length: the runner has no EOS, and the schema (a list of at
least 1,000 records) cannot close before the token budget runs out, so every step is masked.
Sampling is temperature 0.8 / top-k 40 / top-p 0.9 with fixed seeds for both. tok/s is the
engine's own eval rate (tokens after the first / time since the first), aggregated over the
concurrent requests. On the GPU the random-weights checkpoint comes from bench/dummy_models.py;
its word-level tokenizer cannot spell JSON, so --tokenizer gives a byte-level BPE tokenizer
(tokenizer.json) of Llama 3's size that the grammar and the detokenizer use instead.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from daemon.backends.runtime import make_forward  # noqa: E402
from daemon.backends.transformers_backend import load_causal_lm  # noqa: E402
from daemon.config import Settings  # noqa: E402
from daemon.engine.grammar import GrammarCompiler, Masker, entry, json_answer  # noqa: E402
from daemon.engine.params import GenerationRequest, SamplingParams  # noqa: E402
from daemon.engine.runner import Runner  # noqa: E402
from daemon.names import ModelName  # noqa: E402
from daemon.server.app import build_catalog  # noqa: E402
from daemon.store.derived import DerivedCache  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 24},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "city": {"type": "string", "maxLength": 24},
                       "tags": {"type": "array", "items": {"enum": ["friend", "family", "work"]}, "maxItems": 3}},
        "required": ["name", "age", "city", "tags"]}}},
    "required": ["people"],
}
PROMPT = [{"role": "user", "content": "List a thousand people with name, age, city and tags, as JSON."}]


async def _generate(runner: Runner, ids: list[int], n: int, concurrent: int, compiler: GrammarCompiler | None):
    async def one(k: int):
        constraint = compiler.compile(entry(json_answer(SCHEMA), None)).matcher() if compiler else None
        request = GenerationRequest(tuple(ids), SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=k + 1),
                                    max_new_tokens=n, constraint=constraint)
        final, text = None, []
        async for chunk in runner.generate(request):
            text.append(chunk.text)
            if chunk.done:
                final = chunk
        return final, "".join(text)

    return await asyncio.gather(*(one(k) for k in range(concurrent)))


def measure(runner: Runner, ids: list[int], n: int, concurrent: int, compiler: GrammarCompiler | None):
    asyncio.run(_generate(runner, ids, 8, concurrent, compiler))  # warm-up (graphs, allocator, grammar)
    results = asyncio.run(_generate(runner, ids, n, concurrent, compiler))
    finals = [f for f, _ in results]
    assert all(f.eval_count == n for f in finals), [f.eval_count for f in finals]
    rate = sum(f.eval_count - 1 for f in finals) / (max(f.eval_duration_ns for f in finals) / 1e9)
    return rate, results[0][1]


def mask_cost_us(compiler: GrammarCompiler, tokenizer, width: int, device: torch.device, steps: int = 200) -> float:
    """Per-token cost of the mask alone (fill on the CPU, apply on the device), walking a
    schema-valid text."""
    constraint = compiler.compile(entry(json_answer(SCHEMA), None)).matcher()
    masker = Masker()
    ids = tokenizer.encode('{"people":[' + ",".join(
        '{"name":"Ada Lovelace","age":36,"city":"London","tags":["work"]}' for _ in range(40)),
        add_special_tokens=False)[:steps]
    logits = torch.zeros(1, width, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for token in ids:
        masker.apply(logits, masker.fill([constraint]))
        constraint.accept(token)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(ids) * 1e6


def load(args):
    if not args.gpu:
        settings = Settings.from_env(models_dir=Path(args.store), device="cpu")
        resolved = build_catalog(settings).resolve(ModelName.parse(args.model))
        loaded = load_causal_lm(resolved, torch.device("cpu"), DerivedCache(Path(args.store) / "derived"))
        return loaded, loaded.tokenizer, f"{args.model} on the CPU ({torch.get_num_threads()} threads)"
    from transformers import PreTrainedTokenizerFast

    from bench.dummy_models import write_checkpoint

    root = Path(args.root)
    checkpoint = write_checkpoint(root / "llama3-8b-random")
    mf = root / "modelfiles"
    mf.mkdir(parents=True, exist_ok=True)
    (mf / "bench.yaml").write_text(f"tags:\n  {args.quant}:\n    source: {{path: '{checkpoint}'}}\n"
                                   f"    quantization: {args.quant}\n")
    settings = Settings.from_env({}, models_dir=root / "store", user_modelfiles_dir=mf, device="cuda")
    resolved = build_catalog(settings).resolve(ModelName.parse(f"bench:{args.quant}"))
    loaded = load_causal_lm(resolved, torch.device("cuda"), DerivedCache(root / "store" / "derived"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, eos_token="<|eot_id|>",
                                        bos_token="<|begin_of_text|>")
    return loaded, tokenizer, f"Llama-3-8B shapes ({args.quant}, random weights) on {torch.cuda.get_device_name()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--tokenizer", help="a byte-level tokenizer.json for the GPU checkpoint")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--store", default=os.environ.get("OLLAMA_MODELS")
                        or str(Path(tempfile.gettempdir()) / "hfollama-bench"))
    args = parser.parse_args()

    loaded, tokenizer, label = load(args)
    ids = tokenizer.encode(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
                           if tokenizer.chat_template else PROMPT[0]["content"], add_special_tokens=False)
    device = next(loaded.model.parameters()).device
    forward = make_forward(loaded.model, slots=max(args.concurrency), num_ctx=len(ids) + args.tokens + 64)
    runner = Runner(forward, tokenizer, eos_token_ids=[])  # no EOS: always the full length
    compiler = GrammarCompiler(tokenizer, [tokenizer.eos_token_id])
    started = time.perf_counter()
    compiler.tokenizer  # built once per model
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(entry(json_answer(SCHEMA), None))
    compile_ms = (time.perf_counter() - started) * 1000
    width = loaded.model.config.vocab_size
    rows = []
    try:
        for concurrent in args.concurrency:
            free, _ = measure(runner, ids, args.tokens, concurrent, None)
            constrained, sample = measure(runner, ids, args.tokens, concurrent, compiler)
            rows.append((concurrent, free, constrained))
            print(f"batch {concurrent}: {free:.1f} -> {constrained:.1f} tok/s; sample: {sample[:100]!r}", flush=True)
        mask_us = mask_cost_us(compiler, tokenizer, width, device)
    finally:
        runner.close()
        del forward, loaded
        gc.collect()
    print(f"\n{label}; vocabulary {len(tokenizer)}, prompt {len(ids)} tokens, {args.tokens} new tokens, "
          f"temperature 0.8")
    print(f"grammar tables {setup:.2f}s once per model; schema compile {compile_ms:.1f} ms; "
          f"mask fill+apply {mask_us:.0f} us per token")
    print(f"{'requests':>9}{'free tok/s':>12}{'schema tok/s':>14}{'kept':>7}")
    for concurrent, free, constrained in rows:
        print(f"{concurrent:>9}{free:>12.1f}{constrained:>14.1f}{100 * constrained / free:>6.0f}%")


if __name__ == "__main__":
    main()
