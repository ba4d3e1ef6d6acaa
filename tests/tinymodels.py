"""Tiny Llama-architecture models that the tests build and save in Hugging Face format
(config.json, model.safetensors, tokenizer.json with a ChatML chat template), so the real
`from_pretrained` path runs in milliseconds.

Two kinds:
- random: all weights random; attention and MLP matter (for forward-pass checks and
  sampling).
- scripted: attention and MLP outputs are zeroed, so the residual stream is the current
  token's embedding, and the LM head maps each script token to the next one. Greedy decoding
  then emits SCRIPT after any prompt ending in the generation prompt, then EOS. The script
  splits "STOP" across two tokens and "é" across its two UTF-8 bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "system user assistant tail STOP done café naïve",
] * 20
# The scripted answer, as token strings of the byte-level alphabet ("Ġ" is a space).
# "ĠST" + "OP" split the stop word; "Ã" + "©" are the two bytes of "é".
SCRIPT_PIECES = ["Hello", "Ġworld", "ĠST", "OP", "Ġtail", "Ã", "©", "!"]
SCRIPT_TEXT = "Hello world STOP tailé!"


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    missing = [p for p in SCRIPT_PIECES if tok.token_to_id(p) is None]
    if missing:
        tok.add_tokens(missing)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def _config(vocab: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def generation_prompt_last_token(tokenizer: PreTrainedTokenizerFast) -> int:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)[-1]


def build_model(out: Path, scripted: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    model = LlamaForCausalLM(_config(vocab, tokenizer)).eval()
    if scripted:
        _script(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SCRIPT.json").write_text(json.dumps({"text": SCRIPT_TEXT, "scripted": scripted}))
    return out


@torch.no_grad()
def _script(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb = torch.randn(model.config.vocab_size, model.config.hidden_size)
    emb = emb / emb.norm(dim=-1, keepdim=True) * model.config.hidden_size ** 0.5
    model.model.embed_tokens.weight.copy_(emb)
    chain = [generation_prompt_last_token(tokenizer)] + [tokenizer.convert_tokens_to_ids(p) for p in SCRIPT_PIECES]
    chain.append(tokenizer.eos_token_id)
    assert len(set(chain)) == len(chain), "script tokens must be distinct"
    head = torch.randn_like(model.lm_head.weight) * 0.01
    unit = emb / emb.norm(dim=-1, keepdim=True)
    for current, following in zip(chain, chain[1:]):
        head[following] += 2.0 * unit[current]
    # every other token leads to EOS, so generation always ends
    others = torch.ones(model.config.vocab_size, dtype=torch.bool)
    others[chain[:-1]] = False
    head[tokenizer.eos_token_id] += 0.5 * unit[others].sum(0) / others.sum() ** 0.5
    model.lm_head.weight.copy_(head)
