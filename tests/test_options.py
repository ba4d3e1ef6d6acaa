import pytest

from daemon.api.options import Options, OptionTypeError, parse_options


def test_defaults_match_ollama():
    o = Options()
    assert (o.temperature, o.top_k, o.top_p, o.min_p, o.typical_p) == (0.8, 40, 0.9, 0.0, 1.0)
    assert (o.num_predict, o.seed, o.repeat_last_n, o.repeat_penalty, o.num_keep) == (-1, -1, 64, 1.0, 4)


def test_layers_later_wins_and_unknown_keys_are_ignored():
    o = Options.layered({"temperature": 0.2, "stop": ("a",)}, {"temperature": 0, "mirostat": 2, "tfs_z": 1,
                                                                  "num_predict": 7.9, "seed": None})
    assert o.temperature == 0.0 and o.stop == ("a",) and o.num_predict == 7 and o.seed == -1
    assert o.explicit() == {"num_predict": 7, "temperature": 0.0, "stop": ("a",)}


@pytest.mark.parametrize("key,value,message", [
    ("temperature", "hot", 'option "temperature" must be of type float32'),
    ("temperature", True, 'option "temperature" must be of type float32'),
    ("top_k", "4", 'option "top_k" must be of type integer'),
    ("stop", "x", 'option "stop" must be of type array'),
    ("stop", ["x", 1], 'option "stop" must be of an array of strings'),
    ("use_mmap", 1, 'option "use_mmap" must be of type boolean'),
])
def test_type_errors_are_500_with_go_text(key, value, message):
    with pytest.raises(OptionTypeError) as err:
        parse_options({key: value})
    assert err.value.message == message
    from daemon.errors import status_of
    assert status_of(err.value) == 500


@pytest.mark.parametrize("key,value,go_type", [("top_k", 2**63, "int"), ("seed", -(2**63) - 1, "int"),
                                               ("num_predict", 1e19, "int"), ("temperature", 1e39, "float32"),
                                               ("top_p", -1e300, "float32")])
def test_numbers_go_cannot_hold_are_bad_requests(key, value, go_type):
    from daemon.api.options import OptionRangeError
    from daemon.errors import status_of

    with pytest.raises(OptionRangeError) as err:
        Options.layered({key: value})
    assert status_of(err.value) == 400
    assert err.value.message == f"json: cannot unmarshal number {value} into Go struct field Options.{key} of type {go_type}"
    assert Options.layered({"top_k": 2**63 - 1}).top_k == 2**63 - 1  # the largest int64 is fine


@pytest.mark.parametrize("given,used", [(None, 0), (0, 0), (-1, 0), (-(2**40), 0), (1, 4), (3, 4), (4, 4), (2048, 2048)])
def test_num_ctx_zero_or_negative_is_the_default_and_tiny_ones_are_raised(given, used):
    assert Options.layered({"num_ctx": given}).num_ctx == used
