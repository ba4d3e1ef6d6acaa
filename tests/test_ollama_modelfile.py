import pytest

from daemon.registry.ollama_modelfile import ModelfileSyntaxError, parse


def test_full_modelfile():
    body = parse('''# comment
FROM llama3:8b
PARAMETER temperature 0.2
parameter num_ctx 8192
PARAMETER stop "<|eot_id|>"
PARAMETER stop <|start_header_id|>
SYSTEM """You are
helpful."""
TEMPLATE "{{ .Prompt }}"
MESSAGE user Is it?
MESSAGE assistant Yes.
LICENSE """MIT"""
''')
    assert body == {
        "from": "llama3:8b", "system": "You are\nhelpful.", "template": "{{ .Prompt }}", "license": "MIT",
        "parameters": {"temperature": 0.2, "num_ctx": 8192, "stop": ["<|eot_id|>", "<|start_header_id|>"]},
        "messages": [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "Yes."}],
    }


@pytest.mark.parametrize("text,problem", [
    ("SYSTEM hi", "no FROM line"),
    ("FROM x\nBOGUS y", "unknown command 'BOGUS'"),
    ("FROM x\nPARAMETER nope 1", "unknown parameter 'nope'"),
    ("FROM x\nPARAMETER top_k many", "invalid value 'many' for parameter top_k"),
    ('FROM x\nSYSTEM """open', 'unterminated """'),
    ("FROM x\nMESSAGE robot hi", "invalid message role 'robot'"),
    ("FROM x\nADAPTER ./lora", "ADAPTER is not supported"),
])
def test_errors_name_the_line(text, problem):
    with pytest.raises(ModelfileSyntaxError) as err:
        parse(text)
    assert err.value.problem == problem
