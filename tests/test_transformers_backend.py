import pytest
import torch

from daemon.backends.transformers_backend import bnb_config, compute_dtype, converted_gguf_folder, pick_device
from daemon.errors import InternalError
from daemon.registry.modelfile import Quantization
from daemon.store.derived import DerivedCache


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(InternalError, match="CUDA is not available"):
            pick_device("cuda")


def test_dtypes_and_bnb_configs():
    cpu = torch.device("cpu")
    assert compute_dtype(Quantization(mode="nf4", compute_dtype="bfloat16"), cpu) == torch.float32
    nf4 = bnb_config(Quantization(mode="nf4", double_quant=True), torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(Quantization(mode="int8"), torch.float16).load_in_8bit
    assert bnb_config(Quantization(), torch.float16) is None


def test_a_broken_gguf_gives_a_clear_error_and_no_cache_entry(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    cache = DerivedCache(tmp_path / "derived")
    with pytest.raises(InternalError, match="could not convert bad.gguf"):
        converted_gguf_folder(bad, "0" * 64, cache)
    assert cache.get("gguf-" + "0" * 24) is None
