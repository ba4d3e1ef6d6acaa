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


# gpt-oss's harmony format, as far as the tests use it: channels mark the thinking, the answer and
# tool calls (a piece holding several markers is one added token: script tokens are distinct)
HARMONY = (
    "{% if tools %}<|start|>developer<|message|># Tools\n{% for tool in tools %}{{ tool | tojson }}{% endfor %}"
    "<|end|>{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)
HARMONY_SCRIPT = ["<|channel|>analysis<|message|>", THINKING_TEXT, "<|end|><|start|>assistant<|channel|>final<|message|>",
                  ANSWER_TEXT]
HARMONY_TOOL_SCRIPT = ["<|channel|>analysis<|message|>", "Need the weather.",
                       "<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
                       '{"city": "Paris"}']


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


# GGUF tensor types by name (gguf.GGMLQuantizationType values), for write_llama_gguf
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
MIXED_TYPES = {"token_embd": Q8_0, "attn_q": Q4_1, "attn_k": Q4_0, "attn_v": Q4_1, "attn_output": Q8_0,
               "ffn_gate": Q4_1, "ffn_up": F16, "ffn_down": Q4_0}


def write_llama_gguf(path: Path, types: dict[str, int] = MIXED_TYPES, seed: int = 0, tied: bool = True,
                     heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """A random tiny Llama written as llama.cpp's convert_hf_to_gguf.py writes one: its
    tensor names, q and k permuted for ggml's interleaved RoPE, each matrix in the type
    `types` names (gguf-py quantizes). Returns the HF model it was made from."""
    import gguf

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    head_dim = 64 // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_context_length, 256),
                       (writer.add_embedding_length, 64), (writer.add_feed_forward_length, 128),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-5),
                       (writer.add_rope_dimension_count, head_dim), (writer.add_vocab_size, 256)):
        add(value)

    def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add_tensor(name: str, tensor: torch.Tensor, kind: int = F32) -> None:
        values = tensor.detach().float().numpy()
        if kind == F32 or values.ndim == 1:
            writer.add_tensor(name, values)
        elif kind == F16:
            writer.add_tensor(name, values.astype("float16"))
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType(kind)),
                              raw_dtype=gguf.GGMLQuantizationType(kind))

    state = model.state_dict()
    add_tensor("token_embd.weight", state["model.embed_tokens.weight"], types.get("token_embd", F32))
    add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        add_tensor("output.weight", state["lm_head.weight"], types.get("output", F32))
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    for i in range(2):
        for name, module in hf.items():
            w = state[f"model.layers.{i}.{module}.weight"]
            w = permute(w, heads) if name == "attn_q" else permute(w, kv_heads) if name == "attn_k" else w
            add_tensor(f"blk.{i}.{name}.weight", w, types.get(name, F32))
        add_tensor(f"blk.{i}.attn_norm.weight", state[f"model.layers.{i}.input_layernorm.weight"])
        add_tensor(f"blk.{i}.ffn_norm.weight", state[f"model.layers.{i}.post_attention_layernorm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
