"""backends/gguf_weights.py: a GGUF's tensors read from their blocks, against gguf-py's own
dequantization, and llama.cpp's q/k permutation undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.backends.gguf_meta import read_gguf_header
from daemon.backends.gguf_weights import GGUFWeights, unpermute_rows
from daemon.engine.packed import Int4Product, Int8Product
from tests.tinymodels import F16, F32, Q4_0, Q4_1, Q8_0, write_llama_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    model = write_llama_gguf(path)
    return GGUFWeights(path, read_gguf_header(path)), model


def _gguf_dequantized(weights: GGUFWeights, name: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    info = weights.header.tensors[name]
    raw, *_ = weights._raw(name)
    return torch.from_numpy(dequantize(np.asarray(raw), GGMLQuantizationType(info.ggml_type))).reshape(info.shape[1], -1)


@pytest.mark.parametrize("name,kind", [("blk.0.attn_q.weight", Q4_1), ("blk.0.ffn_down.weight", Q4_0)])
def test_4_bit_blocks_are_read_exactly(tiny, name, kind):
    weights, _ = tiny
    assert weights.header.tensors[name].ggml_type == kind
    four = weights.int4(name)
    assert torch.equal(four.dequantize(), _gguf_dequantized(weights, name))
    assert isinstance(weights.product(name), Int4Product)


def test_other_types(tiny):
    weights, model = tiny
    assert weights.int4("token_embd.weight") is None  # Q8_0
    assert torch.equal(weights.float("token_embd.weight"), _gguf_dequantized(weights, "token_embd.weight"))
    assert isinstance(weights.product("blk.0.attn_output.weight"), Int8Product)  # Q8_0: row-wise int8
    up = weights.product("blk.0.ffn_up.weight")  # F16 stays float
    assert isinstance(up, torch.Tensor) and weights.header.tensors["blk.0.ffn_up.weight"].ggml_type == F16
    assert torch.equal(up, model.model.layers[0].mlp.up_proj.weight.detach().half().float())
    norm = weights.float("blk.1.attn_norm.weight")  # F32 vectors come back 1-D
    assert weights.header.tensors["blk.1.attn_norm.weight"].ggml_type == F32
    assert torch.equal(norm, model.model.layers[1].input_layernorm.weight.detach())


@pytest.mark.parametrize("heads,head_dim", [(4, 16), (9, 64), (3, 64), (32, 128)])
def test_unpermute_undoes_llama_cpp_permute(heads, head_dim):
    rows = heads * head_dim
    w = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    permuted = w.reshape(heads, 2, head_dim // 2, 2).swapaxes(1, 2).reshape(w.shape)  # convert_hf_to_gguf.py
    assert torch.equal(permuted[unpermute_rows(rows, heads)], w)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path)
    header = read_gguf_header(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:header.tensors["blk.1.ffn_down.weight"].offset + 10])
    with pytest.raises(ValueError, match="outside the file"):
        GGUFWeights(cut, read_gguf_header(cut)).product("blk.1.ffn_down.weight")
