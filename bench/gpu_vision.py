"""An image through the daemon on the GPU: Gemma-3-12B shapes with its SigLIP tower, or
Qwen2.5-VL-7B shapes with its windowed ViT (random weights), NF4 + double quant for the language
model, the tower in bf16, over HTTP /api/chat.

    python bench/gpu_vision.py --root /tmp/bench [--family gemma3-12b|qwen2.5-vl-7b] [--tokens 256] [--repeats 3]

Per request kind: TTFT (the first content line) and decode tokens/s (eval_count / eval_duration)
of a 64-token question alone, and of the same question with one 896 x 896 image (a new image
each time: the tower runs; then the last image again: its prefix is cached). Decoding after an
image runs on the same fast path as text, so its rate should be the text rate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import aiohttp  # noqa: E402

from bench.dummy_models import SHAPES  # noqa: E402
from bench.gpu_serve import QUANT, memory, start_daemon, stream_chat  # noqa: E402
from daemon.config import Settings, parse_host  # noqa: E402

# google/gemma-3-12b-it's vision side: SigLIP so400m at 896 pixels, 256 tokens an image
VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
          "image_size": 896, "patch_size": 14, "model_type": "siglip_vision_model", "vision_use_head": False}
BOI, EOI, IMAGE = 255999, 256000, 262144
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)


# Qwen/Qwen2.5-VL-7B-Instruct: Qwen2.5-7B's language model with multimodal rotary sections, a
# 32-layer windowed ViT at 14 px patches merged 2 x 2 (an 896 px image: 1,024 tokens)
QWEN_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, model_type="qwen2_5_vl_text",
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN_SPECIALS = {151652: "<|vision_start|>", 151653: "<|vision_end|>", 151655: "<|image_pad|>",
                 151656: "<|video_pad|>"}
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def _tokenizer(vocab_size: int, specials: dict[int, str], bos: str, eos: str, template: str, named: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="t0",
                                   extra_special_tokens=named)
    fast.add_special_tokens({"additional_special_tokens": list(specials.values())})
    fast.chat_template = template
    return fast


def write_checkpoint(out: Path, family: str) -> Path:
    import torch
    import transformers as t

    from daemon.backends.transformers_backend import images_only_class

    if (out / "config.json").exists() and (out / "processor_config.json").exists():
        return out
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if family == "gemma3-12b":
        text = {k: v for k, v in SHAPES["gemma3-12b"].items() if k not in ("architectures", "torch_dtype")}
        config = t.Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=256,
                                image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
        specials = {BOI: "<start_of_image>", EOI: "<end_of_image>", IMAGE: "<image_soft_token>"}
        fast = _tokenizer(text["vocab_size"], specials, "t2", "t106", TEMPLATE,
                          {"boi_token": specials[BOI], "eoi_token": specials[EOI], "image_token": specials[IMAGE]})
        processor = t.Gemma3Processor(image_processor=t.Gemma3ImageProcessor(size={"height": 896, "width": 896}),
                                      tokenizer=fast, image_seq_length=256, chat_template=TEMPLATE)
    else:
        config = t.Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION, image_token_id=151655,
                                    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
        fast = _tokenizer(QWEN_TEXT["vocab_size"], QWEN_SPECIALS, "t151643", "t151645", QWEN_TEMPLATE,
                          {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
        processor = images_only_class(t.Qwen2_5_VLProcessor)(
            image_processor=t.Qwen2VLImageProcessorPil(), tokenizer=fast, video_processor=None,
            chat_template=QWEN_TEMPLATE)
    with torch.device("meta"):
        model = t.AutoModelForImageTextToText.from_config(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                gemma_zero = family.startswith("gemma") and ("language_model" in name or "mm_soft_emb_norm" in name)
                p.fill_(0.0 if gemma_zero or "bias" in name else 1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(out, max_shard_size="5GB")
    processor.save_pretrained(out)
    fast.save_pretrained(out)
    print(f"wrote {family} with vision to {out} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def picture(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (896, 896, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def one(url: str, tokens: int, image: str | None) -> tuple[float, float, int]:
    question = " ".join(f"t{1000 + 37 * j}" for j in range(64))
    message = {"role": "user", "content": question, **({"images": [image]} if image else {})}
    body = {"model": "vision:nf4", "messages": [message], "stream": True,
            "options": {"num_predict": tokens, "temperature": 0}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        first, line = await stream_chat(session, url, body)
    return first * 1000, line["eval_count"] / (line["eval_duration"] / 1e9), line["prompt_eval_count"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/tmp/bench")
    parser.add_argument("--family", default="gemma3-12b", choices=("gemma3-12b", "qwen2.5-vl-7b"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root)
    checkpoint = write_checkpoint(root / f"{args.family}-vision-random", args.family)
    modelfiles = root / f"modelfiles-vision-{args.family}"
    modelfiles.mkdir(parents=True, exist_ok=True)
    (modelfiles / "vision.yaml").write_text(
        f"tags:\n  nf4:\n    source: {{path: '{checkpoint}'}}\n    quantization: {QUANT}\n")
    settings = Settings.from_env({}, bind=parse_host("127.0.0.1:0"), models_dir=root / "store",
                                 user_modelfiles_dir=modelfiles, device="cuda", num_parallel=4, context_length=4096)
    url, stop = start_daemon(settings)
    try:
        started = time.perf_counter()
        asyncio.run(one(url, 8, None))
        print(f"loaded in {time.perf_counter() - started:.0f}s:", memory(url), flush=True)
        rows = []
        for kind in ("text", "image (new)", "image (again)"):
            runs = []
            if kind == "image (again)":  # seen once first, untimed: every timed request then finds it cached
                asyncio.run(one(url, args.tokens, picture(0)))
            for i in range(args.repeats):
                image = None if kind == "text" else picture(0 if kind == "image (again)" else 100 + i)
                runs.append(asyncio.run(one(url, args.tokens, image)))
                print(kind, i + 1, tuple(round(v, 1) for v in runs[-1]), flush=True)
            rows.append((kind, statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
                         runs[-1][2]))
        print(memory(url))
    finally:
        stop()
    tower = {"gemma3-12b": "SigLIP", "qwen2.5-vl-7b": "its ViT"}[args.family]
    print(f"\n{args.family} shapes + {tower}, an 896px image, NF4 + double quant (tower bf16), random weights, "
          f"{args.tokens} new tokens, HTTP /api/chat, median of {args.repeats}")
    print(f"{'request':<16}{'TTFT':>10}{'decode tok/s':>14}{'prompt eval':>13}")
    for kind, ttft, rate, evaluated in rows:
        print(f"{kind:<16}{ttft:>8.0f}ms{rate:>14.1f}{evaluated:>13}")
    text_rate = rows[0][2]
    print(f"decode after an image: {rows[1][2] / text_rate:.2f}x the text rate")


if __name__ == "__main__":
    main()
