from pathlib import Path

import pytest

from daemon.registry.modelfile import ModelfileError, load_file, parse_family
from daemon.registry.registry import shipped_modelfiles_dir

SOURCE = {"repo": "org/name"}


def family(tags, **top):
    return parse_family("f.yaml", {"tags": tags, **top}, "fam")


def test_full_tag():
    tags = family({"t": {
        "source": {"repo": "org/name", "revision": "abc"},
        "quantization": {"mode": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "parameters": {"temperature": 0.5, "stop": "END", "num_ctx": 8192},
        "stop": ["X"], "system": "sys", "template": "{{ .Prompt }}", "license": ["a", "b"],
        "messages": [{"role": "User", "content": "hi"}],
        "fim": {"prefix": "<p>", "suffix": "<s>", "middle": "<m>"},
    }})
    m = tags["t"]
    assert m.name.display == "fam:t" and m.source.repo == "org/name" and m.source.revision == "abc"
    assert (m.quantization.mode, m.quantization.double_quant, m.quantization.compute_dtype) == ("nf4", True, "bfloat16")
    assert m.quantization.label == "NF4"
    assert m.parameters == {"temperature": 0.5, "stop": ("END", "X"), "num_ctx": 8192}
    assert m.license == "a\nb" and m.messages == ({"role": "user", "content": "hi"},) and m.fim.middle == "<m>"


def test_defaults_merge_and_aliases():
    tags = family({"a": {"source": SOURCE, "parameters": {"top_k": 5}}, "b": {"alias": "a"}, "c": {"alias": "b"}},
                  defaults={"parameters": {"temperature": 0.1}, "quantization": "int8"}, family="other")
    assert tags["a"].parameters == {"temperature": 0.1, "top_k": 5} and tags["a"].quantization.mode == "int8"
    assert tags["c"].name.display == "other:c" and tags["c"].alias_of == "other:a" and tags["c"].source == tags["a"].source


ERRORS = [
    ({"tags": {}}, "tags", "must be a non-empty mapping of tag names"),
    ({"tags": {"t": {}}}, "tags.t.source", "required"),
    ({"tags": {"t": {"source": {"repo": "x"}}}}, "tags.t.source.repo", "refusing repository 'x': not of the form org/name"),
    ({"tags": {"t": {"source": {"repo": "o/n", "revision": "../../x"}}}}, "tags.t.source.revision",
     "refusing revision '../../x': not a git ref name"),
    ({"tags": {"t": {"source": {"repo": "o/n", "gguf": "/etc/x.gguf"}}}}, "tags.t.source.gguf",
     "refusing file path '/etc/x.gguf': it is absolute"),
    ({"tags": {"t": {"source": {"repo": "a/b", "path": "/x"}}}}, "tags.t.source",
     "needs exactly one of repo, package or path"),
    ({"tags": {"t": {"source": {"package": "p"}}}}, "tags.t.source.file", "required with package"),
    ({"tags": {"t": {"source": SOURCE, "quantization": "q3"}}}, "tags.t.quantization.mode",
     "'q3' is not one of none, nf4, fp4, int8"),
    ({"tags": {"t": {"source": SOURCE, "quantization": {"mode": "int8", "double_quant": True}}}},
     "tags.t.quantization.double_quant", "applies to nf4 and fp4 only"),
    ({"tags": {"t": {"source": SOURCE, "parameters": {"temprature": 1}}}}, "tags.t.parameters.temprature",
     "unknown option"),
    ({"tags": {"t": {"source": SOURCE, "parameters": {"top_k": "many"}}}}, "tags.t.parameters.top_k",
     'option "top_k" must be of type integer'),
    ({"tags": {"t": {"source": SOURCE, "sytem": "x"}}}, "tags.t.sytem", "unknown key"),
    ({"tags": {"t": {"alias": "nope"}}}, "tags.t.alias", "no tag 'nope' in this file"),
    ({"tags": {"t": {"source": SOURCE}}, "family": "bad name"}, "family", "'bad name' is not a valid model name"),
    ({"tags": {"t": {"source": SOURCE, "messages": [{"content": "x"}]}}}, "tags.t.messages[0]",
     "must be a mapping with string role and content"),
    ({"tags": {"t": {"source": SOURCE, "fim": {"prefix": "a"}}}}, "tags.t.fim",
     "must have string prefix, suffix and middle tokens"),
    ({"tagz": {}}, "tagz", "unknown key"),
]


@pytest.mark.parametrize("doc,key,problem", ERRORS, ids=[e[1] for e in ERRORS])
def test_errors_name_file_key_and_problem(doc, key, problem):
    with pytest.raises(ModelfileError) as err:
        parse_family("models/fam.yaml", doc, "fam")
    assert (err.value.file, err.value.key, err.value.problem) == ("models/fam.yaml", key, problem)
    assert str(err.value) == f"models/fam.yaml: {key}: {problem}"


def test_invalid_yaml_names_the_line(tmp_path: Path):
    f = tmp_path / "x.yaml"
    f.write_text("tags:\n  a: [unclosed\n")
    with pytest.raises(ModelfileError) as err:
        load_file(f)
    assert err.value.file == str(f) and err.value.key.startswith("line ")


def test_shipped_modelfiles_are_valid():
    files = sorted(shipped_modelfiles_dir().glob("*.yaml"))
    names = {m.name.display for f in files for m in load_file(f).values()}
    for expected in ["smollm2:135m", "llama3:instruct", "llama3:8b-instruct", "llama3:8b", "llama3:70b",
                     "llama3:70b-instruct", "llama3:latest", "llama3:8b-instruct-bnb-4bit", "llama3.2:3b",
                     "llama3.1:8b"]:
        assert expected in names
    llama3 = load_file(shipped_modelfiles_dir() / "llama3.yaml")
    q = llama3["instruct"].quantization
    assert (q.mode, q.double_quant) == ("nf4", True)
    assert llama3["8b-instruct-bnb-4bit"].quantization.mode == "none"
    assert load_file(shipped_modelfiles_dir() / "llama3.2.yaml")["3b"].quantization.compute_dtype == "bfloat16"
