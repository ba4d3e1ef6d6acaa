import json

import pytest

from daemon.backends.metadata import human_number, read_metadata


@pytest.mark.parametrize("n,text", [(8_030_261_248, "8.0B"), (8_000_000_000, "8B"), (134_515_008, "134.52M"),
                                    (567_000_000, "567M"), (120_064, "120K"), (999, "999")])
def test_human_number(n, text):
    assert human_number(n) == text


def test_hf_folder(tiny_dirs):
    m = read_metadata(tiny_dirs["random"])
    assert m.format == "safetensors" and m.architecture == "llama" and not m.is_embedding_model
    assert m.context_length == 2048 and m.embedding_length == 64
    assert m.info["llama.block_count"] == 2 and m.info["llama.attention.head_count_kv"] == 2
    assert m.parameter_count > 0 and m.quantization_level == "F32"
    assert "im_start" in m.chat_template


def test_prequantized_config_reports_its_quantization(tiny_dirs, tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    config = json.loads((tiny_dirs["random"] / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    assert read_metadata(folder).quantization_level == "NF4"


@pytest.mark.parametrize("config,processor,expected", [
    ({"vision_config": {"hidden_size": 8}}, True, True),
    ({"vision_config": {"hidden_size": 8}}, False, False),  # no processor settings: text only
    ({}, True, False),
    # Qwen2-VL's and Qwen2.5-VL's multimodal rotary positions are built; Qwen3-VL's interleaved
    # ones (and its features fed to middle layers) are not: its images would go wrong, its text not
    *(({"model_type": kind, "vision_config": {},
        "text_config": {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}}, True, True)
      for kind in ("qwen2_vl", "qwen2_5_vl")),
    ({"model_type": "qwen3_vl", "vision_config": {},
      "text_config": {"rope_scaling": {"mrope_section": [24, 20, 20], "mrope_interleaved": True}}}, True, False),
])
def test_vision_checkpoints(tmp_path, config, processor, expected):
    import json

    from daemon.backends.metadata import is_vision_checkpoint

    (tmp_path / "config.json").write_text(json.dumps(config))
    if processor:
        (tmp_path / "preprocessor_config.json").write_text("{}")
    assert is_vision_checkpoint(tmp_path) is expected
