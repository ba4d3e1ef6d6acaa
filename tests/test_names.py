import pytest

from daemon.names import ModelName

VALID = [
    # text, display, full
    ("llama3", "llama3:latest", "registry.ollama.ai/library/llama3:latest"),
    ("llama3:8b", "llama3:8b", "registry.ollama.ai/library/llama3:8b"),
    ("Llama3.2:Latest", "Llama3.2:Latest", "registry.ollama.ai/library/Llama3.2:Latest"),
    ("ns/model:tag", "ns/model:tag", "registry.ollama.ai/ns/model:tag"),
    ("library/llama3", "llama3:latest", "registry.ollama.ai/library/llama3:latest"),
    ("host.io/ns/m", "host.io/ns/m:latest", "host.io/ns/m:latest"),
    ("host:5000/ns/m", "host:5000/ns/m:latest", "host:5000/ns/m:latest"),
    ("host:5000/ns/m:v1", "host:5000/ns/m:v1", "host:5000/ns/m:v1"),
    ("https://host/ns/m:t", "host/ns/m:t", "host/ns/m:t"),
    ("hf.co/org/repo:Q4_K_M", "hf.co/org/repo:Q4_K_M", "hf.co/org/repo:Q4_K_M"),
    ("m@sha256:abc", "m:latest", "registry.ollama.ai/library/m:latest"),
    ("_m:_t", "_m:_t", "registry.ollama.ai/library/_m:_t"),
    ("  llama3  ", "llama3:latest", "registry.ollama.ai/library/llama3:latest"),
]


@pytest.mark.parametrize("text,display,full", VALID)
def test_valid_names(text, display, full):
    name = ModelName.parse(text)
    assert name.is_valid
    assert name.display == display
    assert name.full == full


INVALID = ["", "m:", "ns/", "/m", ":t", "a/b/c/d", ".m", "-m", "m:.t", "ns.x/m", "m!", "m:t/x", "x" * 81,
           "m:" + "t" * 81, "a b", "m:t:u/"]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_names(text):
    assert not ModelName.parse(text).is_valid


def test_scheme_and_case_insensitive_key():
    assert ModelName.parse("http://h/ns/m").scheme == "http"
    assert ModelName.parse("LLAMA3:Instruct").key == ModelName.parse("llama3:instruct").key
    assert ModelName.parse("llama3").is_default_namespace
    assert not ModelName.parse("ns/llama3").is_default_namespace


def test_with_tag():
    assert ModelName.parse("llama3").with_tag("8b").display == "llama3:8b"
