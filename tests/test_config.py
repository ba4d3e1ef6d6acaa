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


@pytest.mark.parametrize("text,value", [("", "auto"), ("on", "on"), ("OFF", "off"), (" auto ", "auto"), ("maybe", "auto")])
def test_batch_weights_setting(text, value):
    assert Settings.from_env({"HFOLLAMA_BATCH_WEIGHTS": text}).batch_weights == value


@pytest.mark.parametrize("text, value", [("", True), ("on", True), ("OFF", False), ("off", False), ("nope", True)])
def test_prefix_cache_setting(text, value):
    assert Settings.from_env({"HFOLLAMA_PREFIX_CACHE": text}).prefix_cache is value

