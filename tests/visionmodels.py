"""Tiny random vision models built from the real configs of Gemma 3 (gemma-3-4b-it: a SigLIP
tower, its patches average-pooled to a fixed count of soft tokens between <start_of_image> and
<end_of_image>, which attend to each other bidirectionally), LLaVA 1.5 (llava-1.5-7b-hf: a
CLIP tower's second-to-last layer without its CLS token, a two-layer GELU projector, one <image>
token per patch), LLaVA-NeXT (llava-v1.6-mistral-7b-hf: the same tower over the whole picture and
its any-resolution tiles, a learned newline closing each row) and Qwen2.5-VL (Qwen2.5-VL-3B-Instruct: a windowed ViT whose 2 x 2 patches are
merged into one token each, its tokens placed by multimodal rotary positions: time, row and
column), scaled down, saved in HF format with their processors (image processors constructed
here, PIL backends: no torchvision) and chat templates, so that the processor and
from_pretrained run for real and outputs can be compared with transformers' own generate().
Qwen2.5-VL's processor is saved and loaded without its video processor (which needs torchvision),
as the daemon loads it (`images_only_processor`).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

import families
from tinymodels import build_tokenizer

# gemma-3-4b-it's chat template, as far as the tests use it (roles, image parts, text parts)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# llava-1.5-7b-hf's
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen2.5-VL-3B-Instruct's, as far as the tests use it (its default system prompt, image parts)
QWEN25VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# llava-v1.6-mistral-7b-hf's
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"
)
VISION = ("gemma3-vision", "llava", "llava-next", "qwen2.5-vl")


def _tokenizer(extra: dict[str, str], template: str) -> PreTrainedTokenizerFast:
    base = build_tokenizer()
    base.add_special_tokens({"additional_special_tokens": list(extra.values())})
    tok = PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>", extra_special_tokens=extra)
    tok.chat_template = template
    return tok


def _randomize(model: torch.nn.Module, gemma: bool) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "norm" in name or "ln" in name:
                p.uniform_(-0.2, 0.2) if gemma and "language_model" in name else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)


def build(out: Path, family: str, seed: int = 0) -> Path:
    """A tiny random vision model of `family` (VISION) with its processor, saved at `out`."""
    import transformers as t

    from daemon.backends.transformers_backend import images_only_class

    torch.manual_seed(seed)
    if family == "gemma3-vision":
        tok = _tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"}, GEMMA3_TEMPLATE)
        text = families.configs(len(tok), tok)["gemma3"]
        config = t.Gemma3Config(
            text_config=text.to_dict(), mm_tokens_per_image=4,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
            boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))
        images = t.Gemma3ImageProcessor(size={"height": 32, "width": 32})
        processor = t.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                      chat_template=GEMMA3_TEMPLATE)
    elif family == "llava":
        tok = _tokenizer({"image_token": "<image>"}, LLAVA_TEMPLATE)
        text = families.configs(len(tok), tok)["llama"]
        config = t.LlavaConfig(
            text_config=text.to_dict(),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=32),
            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
            vision_feature_select_strategy="default")
        images = t.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = t.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                     chat_template=LLAVA_TEMPLATE)
    elif family == "llava-next":
        # llava-v1.6-mistral-7b-hf: any-resolution tiles (the picture's best grid of 336 px tiles
        # beside its whole, here 32 px), unpadded and closed by a learned newline per row
        tok = _tokenizer({"image_token": "<image>"}, MISTRAL_TEMPLATE)
        text = families.configs(len(tok), tok)["mistral"].to_dict()
        text["sliding_window"] = None  # Mistral-7B-Instruct-v0.2's
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        config = t.LlavaNextConfig(
            text_config=text,
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=32),
            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
        images = t.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
        processor = t.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                         chat_template=MISTRAL_TEMPLATE)
    elif family == "qwen2.5-vl":
        tok = _tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                          "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
                         QWEN25VL_TEMPLATE)
        text = families.configs(len(tok), tok)["qwen2"].to_dict()
        # head_dim 16 here: its 8 rotary frequencies split 2 / 3 / 3 between time, rows and
        # columns, as 128's 64 split 16 / 24 / 24
        text.update(model_type="qwen2_5_vl_text", tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
        config = t.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                               fullatt_block_indexes=[1], tokens_per_second=2),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        images = t.Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=96 * 96, patch_size=8, merge_size=2,
                                            temporal_patch_size=2)
        processor = images_only_class(t.Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tok, video_processor=None,
                                                       chat_template=QWEN25VL_TEMPLATE)
    else:
        raise ValueError(family)
    model = t.AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    _randomize(model, family.startswith("gemma"))
    model.generation_config.eos_token_id = None  # greedy runs are full length
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def picture(width: int = 48, height: int = 40, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small image with structure (so that two pictures give two answers)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def processor_of(path: Path):
    from daemon.backends.transformers_backend import load_processor

    return load_processor(path, path.name)


def _hf(path: Path, messages: list[dict], images: list[bytes]):
    from PIL import Image
    import transformers as t

    processor = processor_of(path)
    model = t.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(io.BytesIO(d)).convert("RGB") for d in images] or None
    return model, processor(text=text, images=pictures, return_tensors="pt", add_special_tokens=False)


def hf_greedy(path: Path, messages: list[dict], images: list[bytes], n: int = 16) -> list[int]:
    """transformers' own generate() on the processor's output for the chat template's prompt."""
    model, inputs = _hf(path, messages, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_first_logprobs(path: Path, messages: list[dict], images: list[bytes]) -> torch.Tensor:
    """transformers' forward over that prompt: the log-probabilities of the first answer token
    (Gemma 3's with its image tokens attending to each other, as generate() runs it)."""
    model, inputs = _hf(path, messages, images)
    with torch.no_grad():
        return torch.log_softmax(model(**inputs).logits[0, -1].float(), dim=-1)
