import logging
from pathlib import Path

import pytest

from daemon.config import TRACE, Settings, log_level, parse_host


@pytest.mark.parametrize("text,scheme,host,port,path", [
    ("", "http", "127.0.0.1", 11434, ""),
    ("0.0.0.0", "http", "0.0.0.0", 11434, ""),
    (":8080", "http", "0.0.0.0", 8080, ""),
    ("localhost:1234", "http", "localhost", 1234, ""),
    ("http://example.com", "http", "example.com", 80, ""),
    ("https://example.com", "https", "example.com", 443, ""),
    ("http://h:99/prefix", "http", "h", 99, "prefix"),
    ("[::1]:5000", "http", "::1", 5000, ""),
    ("::1", "http", "::1", 11434, ""),
    ("example.com:notaport", "http", "example.com", 11434, ""),
    ("'127.0.0.1:9'", "http", "127.0.0.1", 9, ""),
    ("host:70000", "http", "host", 11434, ""),
])
def test_ollama_host_forms(text, scheme, host, port, path):
    bind = parse_host(text)
    assert (bind.scheme, bind.host, bind.port, bind.path) == (scheme, host, port, path)


def test_loopback_detection():
    assert parse_host("").is_loopback and parse_host("localhost:1").is_loopback and parse_host("[::1]:1").is_loopback
    assert not parse_host("0.0.0.0").is_loopback and not parse_host("10.0.0.1").is_loopback


def test_from_env_reads_ollama_variables(tmp_path):
    env = {
        "OLLAMA_HOST": "0.0.0.0:9999", "OLLAMA_MODELS": str(tmp_path / "m"), "OLLAMA_KEEP_ALIVE": "10m",
        "OLLAMA_ORIGINS": "chrome-extension://*, https://x.example", "OLLAMA_CONTEXT_LENGTH": "8192",
        "OLLAMA_DEBUG": "1", "OLLAMA_NUM_PARALLEL": "8", "OLLAMA_MAX_QUEUE": "3", "HOME": str(tmp_path),
        "HFOLLAMA_MODELFILES": str(tmp_path / "mf"),
    }
    s = Settings.from_env(env)
    assert (s.bind.host, s.bind.port) == ("0.0.0.0", 9999)
    assert s.models_dir == tmp_path / "m" and s.modelfiles_dir == tmp_path / "mf"
    assert s.keep_alive_ns == 600 * 10**9
    assert s.origins == ("chrome-extension://*", "https://x.example")
    assert s.context_length == 8192 and s.num_parallel == 8 and s.max_queue == 3
    assert s.log_level == logging.DEBUG


def test_defaults_and_flag_overrides(tmp_path):
    s = Settings.from_env({"HOME": str(tmp_path)})
    assert s.models_dir == tmp_path / ".hfollama" / "models"
    assert s.modelfiles_dir == tmp_path / ".hfollama" / "modelfiles"
    assert s.keep_alive_ns == 300 * 10**9 and s.origins == ()
    flagged = Settings.from_env({"HOME": str(tmp_path), "OLLAMA_CONTEXT_LENGTH": "100"}, context_length=200,
                                models_dir=Path("/x"), device=None)
    assert flagged.context_length == 200 and flagged.models_dir == Path("/x") and flagged.device == "auto"


@pytest.mark.parametrize("text,level", [("", logging.INFO), ("0", logging.INFO), ("false", logging.INFO),
                                        ("1", logging.DEBUG), ("true", logging.DEBUG), ("2", TRACE)])
def test_debug_levels(text, level):
    assert log_level(text) == level


@pytest.mark.parametrize("text,value", [("", "off"), ("on", "on"), ("OFF", "off"), (" on ", "on"), ("auto", "off"), ("maybe", "off")])
def test_batch_weights_setting(text, value):
    assert Settings.from_env({"HFOLLAMA_BATCH_WEIGHTS": text}).batch_weights == value


@pytest.mark.parametrize("text, value", [("", True), ("on", True), ("OFF", False), ("off", False), ("nope", True)])
def test_prefix_cache_setting(text, value):
    assert Settings.from_env({"HFOLLAMA_PREFIX_CACHE": text}).prefix_cache is value


@pytest.mark.parametrize("env,keys", [
    ({}, ()), ({"HFOLLAMA_API_KEYS": "a"}, ("a",)), ({"HFOLLAMA_API_KEYS": " a, b  c,,"}, ("a", "b", "c")),
])
def test_api_keys(env, keys):
    assert Settings.from_env(env).api_keys == keys


def test_api_keys_file_adds_and_an_empty_one_is_an_error(tmp_path):
    f = tmp_path / "keys"
    f.write_text("k1\n  # a comment\n\nk2  \n")
    assert Settings.from_env({"HFOLLAMA_API_KEYS": "k0", "HFOLLAMA_API_KEYS_FILE": str(f)}).api_keys == ("k0", "k1", "k2")
    f.write_text("# none\n")
    with pytest.raises(ValueError, match="holds no keys"):
        Settings.from_env({"HFOLLAMA_API_KEYS_FILE": str(f)})
    with pytest.raises(ValueError, match="cannot read"):
        Settings.from_env({"HFOLLAMA_API_KEYS_FILE": str(tmp_path / "nope")})


def test_keys_stay_out_of_the_settings_repr():
    assert "secret-key" not in repr(Settings.from_env({"HFOLLAMA_API_KEYS": "secret-key", "HF_TOKEN": "hf_x"}))


@pytest.mark.parametrize("env,metrics_auth,log_format", [
    ({}, True, "text"), ({"HFOLLAMA_METRICS_AUTH": "off", "HFOLLAMA_LOG_FORMAT": "JSON"}, False, "json"),
    ({"HFOLLAMA_LOG_FORMAT": "xml"}, True, "text"),
])
def test_metrics_auth_and_log_format(env, metrics_auth, log_format):
    s = Settings.from_env(env)
    assert (s.metrics_auth, s.log_format) == (metrics_auth, log_format)
