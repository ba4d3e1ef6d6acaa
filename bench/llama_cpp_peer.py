"""The peer on the same card: llama.cpp (the engine inside Ollama) on Llama-3-8B shapes with
random weights, so that hfollama's GPU figures have a same-machine reference.

    python bench/llama_cpp_peer.py --bin LLAMA [--root /tmp/bench] [--types q4_0 f16]

LLAMA is llama.cpp's `llama-bench` and `llama-batched-bench` linked into one executable (one
copy of the CUDA kernels to carry to a machine without network), built with CUDA
(GGML_CUDA=ON): `LLAMA bench ARGS` runs the first, `LLAMA batched ARGS` the second. Per type, a GGUF with Llama-3-8B's
shapes is written with random contents (Q4_0 as llama-quantize makes it: every matrix in
Q4_0, the output matrix in Q6_K; or F16), then `llama-bench` measures decode at batch 1
(tg256) and prefill of 1,024 tokens (pp1024), and `llama-batched-bench` the aggregate decode
of 1, 8 and 32 parallel sequences (128-token prompts, 256 new tokens each). Flash
attention on, all layers on the GPU. One table at the end.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dummy_models import LLAMA3_8B  # noqa: E402

# bytes per block and weights per block (ggml's block_q4_0 and block_q6_K)
Q4_0 = (18, 32)
Q6_K = (210, 256)


def _random_blocks(rng: np.random.Generator, rows: int, cols: int, layout: tuple[int, int], scale_at: int) -> np.ndarray:
    """Random quantized rows whose fp16 block scale (at byte `scale_at` of each block) is a
    small normal number, so the model computes finite values."""
    size, per = layout
    blocks = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    blocks[:, :, scale_at:scale_at + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def _random_f16(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
    return ((bits & 0x83FF) | 0x2000).view(np.float16)  # |x| < 2^-7: finite, no denormals


def write_gguf(path: Path, kind: str) -> Path:
    """A Llama-3-8B-shaped GGUF with random contents (each distinct shape drawn once and
    reused: speed depends on shapes and bytes, not on values)."""
    import gguf

    if path.exists():
        return path
    started = time.perf_counter()
    c = LLAMA3_8B
    hidden, inter, vocab, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    pools: dict[tuple, np.ndarray] = {}

    def matrix(rows: int, cols: int, output: bool = False) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
        if kind == "f16":
            key = (rows, cols, "f16")
            if key not in pools:
                pools[key] = _random_f16(rng, rows, cols)
            return pools[key], gguf.GGMLQuantizationType.F16
        layout, qtype, scale_at = ((Q6_K, gguf.GGMLQuantizationType.Q6_K, 208) if output
                                   else (Q4_0, gguf.GGMLQuantizationType.Q4_0, 0))
        key = (rows, cols, qtype)
        if key not in pools:
            pools[key] = _random_blocks(rng, rows, cols, layout, scale_at)
        return pools[key], qtype

    norm = np.ones(hidden, dtype=np.float32)
    tensors = [("token_embd.weight", *matrix(vocab, hidden))]
    for i in range(layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", norm, None),
            (f"blk.{i}.attn_q.weight", *matrix(hidden, hidden)),
            (f"blk.{i}.attn_k.weight", *matrix(kv_heads * head_dim, hidden)),
            (f"blk.{i}.attn_v.weight", *matrix(kv_heads * head_dim, hidden)),
            (f"blk.{i}.attn_output.weight", *matrix(hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", norm, None),
            (f"blk.{i}.ffn_gate.weight", *matrix(inter, hidden)),
            (f"blk.{i}.ffn_up.weight", *matrix(inter, hidden)),
            (f"blk.{i}.ffn_down.weight", *matrix(hidden, inter)),
        ]
    tensors += [("output_norm.weight", norm, None), ("output.weight", *matrix(vocab, hidden, output=True))]

    tmp = path.with_suffix(".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(vocab)
    writer.add_file_type(1 if kind == "f16" else 2)  # LLAMA_FTYPE_MOSTLY_F16 / _Q4_0
    # a SentencePiece-style vocabulary of plain words: what the benchmarks need (ids, BOS/EOS)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, data, qtype in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data)
    writer.close()
    tmp.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f}s", flush=True)
    return path


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-3000:] if done.returncode else "", flush=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} exited with {done.returncode}")
    return done.stdout + done.stderr  # the tools log their tables to either


def bench_single(binary: Path, model: Path) -> dict[str, float]:
    """tokens/s of pp1024 and tg256 from llama-bench's markdown table."""
    out = run([str(binary), "bench", "-m", str(model), "-ngl", "99", "-fa", "1", "-p", "1024", "-n", "256",
               "-r", "3"])
    found = {}
    for line in out.splitlines():
        m = re.search(r"\|\s*(pp\d+|tg\d+)\s*\|\s*([\d.]+)\s*±", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def bench_parallel(binary: Path, model: Path, levels: list[int]) -> dict[int, float]:
    """Aggregate decode tokens/s (S_TG) of llama-batched-bench per number of sequences."""
    ctx = max(levels) * (128 + 256) + 256
    out = run([str(binary), "batched", "-m", str(model), "-ngl", "99", "-fa", "on", "-c", str(ctx),
               "-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "256", "-npl", ",".join(map(str, levels))])
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[2].isdigit() and int(cells[2]) in levels:
            found[int(cells[2])] = float(cells[7])  # PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, ...
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="llama.cpp's two benchmarks in one executable")
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--types", nargs="+", default=["q4_0", "f16"], choices=["q4_0", "f16"])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    binary, root = Path(args.bin), Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.types:
        model = write_gguf(root / f"llama3-8b-random-{kind}.gguf", kind)
        single = bench_single(binary, model)
        parallel = bench_parallel(binary, model, args.parallel) if kind == "q4_0" else {}
        rows.append((kind, model.stat().st_size / 2**30, single, parallel))
    import torch

    print(f"\nllama.cpp, Llama-3-8B shapes, random weights, flash attention, {torch.cuda.get_device_name()}")
    print(f"{'type':<6}{'GiB':>6}{'tg256 tok/s':>13}{'pp1024 tok/s':>14}  aggregate decode by parallel sequences")
    for kind, size, single, parallel in rows:
        agg = ", ".join(f"{n}: {v:.0f}" for n, v in sorted(parallel.items())) or "-"
        print(f"{kind:<6}{size:>6.2f}{single.get('tg256', float('nan')):>13.1f}"
              f"{single.get('pp1024', float('nan')):>14.0f}  {agg}")


if __name__ == "__main__":
    main()
