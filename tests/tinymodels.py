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

# A Hermes / Qwen-style template with tools, and a script that calls one.
HERMES_TOOLS = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "</tools>\nCall a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>' + message['content'] + "
    "'</tool_response><|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant\n"
    "{% for call in message['tool_calls'] %}<tool_call>\n{{ {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL_CALL_ARGUMENTS = {"city": "Paris"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                   "required": ["city"]}}}
TOOL_SCRIPT = ["<tool_call>", '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', "</tool_call>"]

# A Qwen3-style thinking template: think:false closes an empty block in the prompt.
THINKING = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think></think>' }}{% endif %}{% endif %}"
)
THINKING_TEXT, ANSWER_TEXT = "Paris is in France.", "The capital is Paris."
THINKING_SCRIPT = ["<think>", THINKING_TEXT, "</think>", ANSWER_TEXT]


def build_tokenizer(script: list[str] = SCRIPT_PIECES, template: str = CHATML) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    missing = [p for p in script if tok.token_to_id(p) is None]
    if missing:
        tok.add_tokens(missing)  # whole pieces (tool-call markers, sentences) as single tokens
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = template
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


def build_model(out: Path, scripted: bool, seed: int = 0, script: list[str] = SCRIPT_PIECES,
                template: str = CHATML) -> Path:
    """`script`: the pieces the scripted model says (byte-level tokens, or whole new tokens)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(script, template)
    vocab = len(tokenizer)
    model = LlamaForCausalLM(_config(vocab, tokenizer)).eval()
    if scripted:
        _script(model, tokenizer, script)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SCRIPT.json").write_text(json.dumps({"pieces": script, "scripted": scripted}))
    return out


@torch.no_grad()
def _script(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, script: list[str]) -> None:
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb = torch.randn(model.config.vocab_size, model.config.hidden_size)
    emb = emb / emb.norm(dim=-1, keepdim=True) * model.config.hidden_size ** 0.5
    model.model.embed_tokens.weight.copy_(emb)
    chain = [generation_prompt_last_token(tokenizer)] + [tokenizer.convert_tokens_to_ids(p) for p in script]
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
