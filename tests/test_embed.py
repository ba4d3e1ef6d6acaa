"""Embeddings: the pooling pipeline (engine/embed.py) and /api/embed, /api/embeddings
(server/handlers/embed.py), checked against sentence-transformers' own vectors for
all-MiniLM-L6-v2 (tests/data/minilm_reference.json, made with sentence-transformers 6.2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import ollama
import pytest
import torch

from daemon.engine.embed import Pooling, l2_normalize, pool, read_pooling
from daemon.errors import BadRequest

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# --- the pipeline ------------------------------------------------------------------------

HIDDEN = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # third position is padding
MASK = torch.tensor([[1, 1, 0]])


@pytest.mark.parametrize("mode, expected", [
    ("mean", [2.0, 2.0]),
    ("cls", [1.0, 0.0]),
    ("max", [3.0, 4.0]),
    ("last", [3.0, 4.0]),
])
def test_pool_ignores_padding(mode, expected):
    assert pool(HIDDEN, MASK, mode)[0].tolist() == expected


@pytest.mark.parametrize("modules, pooling_cfg, st_cfg, expected", [
    (None, None, None, Pooling("mean", False, None)),
    ([{"type": "sentence_transformers.models.Transformer", "path": ""},
      {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
      {"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"}],
     {"pooling_mode_mean_tokens": True}, {"max_seq_length": 256}, Pooling("mean", True, 256)),
    ([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
     {"pooling_mode_cls_token": True}, None, Pooling("cls", False, None)),
    ([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
     {"pooling_mode_lasttoken": True}, None, Pooling("last", False, None)),
])
def test_read_pooling_from_sentence_transformers_config(tmp_path, modules, pooling_cfg, st_cfg, expected):
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling_cfg is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    if st_cfg is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps(st_cfg))
    assert read_pooling(tmp_path) == expected


def test_l2_normalize_and_dimensions():
    assert l2_normalize([3.0, 4.0]) == pytest.approx([0.6, 0.8])
    assert l2_normalize([3.0, 4.0, 12.0], dimensions=2) == pytest.approx([0.6, 0.8])
    with pytest.raises(BadRequest):
        l2_normalize([float("nan"), 1.0])


# --- the endpoints, live -------------------------------------------------------------------

@pytest.fixture()
def client(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url)


def test_all_minilm_matches_sentence_transformers(client):
    """Our vectors for the shipped all-MiniLM-L6-v2 against sentence-transformers' own, the
    last text long enough to be truncated at the model's 256 tokens."""
    r = client.embed(model="all-minilm", input=REFERENCE["texts"])
    assert len(r.embeddings) == len(REFERENCE["embeddings"])
    for ours, theirs in zip(r.embeddings, REFERENCE["embeddings"]):
        assert len(ours) == 384
        assert cosine(ours, theirs) >= 1 - 1e-4
    assert r.prompt_eval_count > 256


def test_batch_equals_one_by_one(client):
    texts = REFERENCE["texts"][:3]
    batch = client.embed(model="all-minilm:l6-v2", input=texts).embeddings
    for text, vector in zip(texts, batch):
        single = client.embed(model="all-minilm:l6-v2", input=text).embeddings[0]
        assert single == pytest.approx(vector, abs=1e-5)


def test_embed_is_normalized_and_dimensions_truncate(client):
    full = client.embed(model="all-minilm", input="Why is the sky blue?").embeddings[0]
    assert math.fsum(v * v for v in full) == pytest.approx(1.0, abs=1e-5)
    short = client.embed(model="all-minilm", input="Why is the sky blue?", dimensions=32).embeddings[0]
    assert len(short) == 32 and math.fsum(v * v for v in short) == pytest.approx(1.0, abs=1e-5)
    assert cosine(short, full[:32]) == pytest.approx(1.0, abs=1e-6)


def test_legacy_embeddings_is_the_models_raw_vector(client):
    legacy = client.embeddings(model="all-minilm", prompt=REFERENCE["texts"][1]).embedding
    assert cosine(legacy, REFERENCE["embeddings"][1]) >= 1 - 1e-4
    assert client.embeddings(model="all-minilm", prompt="").embedding == []


def test_truncate_false_over_context_is_an_error(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="all-minilm", input=REFERENCE["texts"][3], truncate=False)
    assert err.value.status_code == 400 and "exceeds the context length" in err.value.error


def test_empty_input_loads_the_model(daemon):
    r = httpx.post(daemon.url + "/api/embed", json={"model": "all-minilm", "input": []}, timeout=60)
    assert r.status_code == 200 and r.json() == {"model": "all-minilm", "embeddings": []}
    ps = httpx.get(daemon.url + "/api/ps").json()["models"]
    assert any(m["model"].startswith("all-minilm:") for m in ps)


def test_generate_model_embeds_by_mean_pooling(client):
    r = client.embed(model="tiny:random", input=["one", "two words"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    assert r.embeddings[0] != r.embeddings[1]
    assert math.fsum(v * v for v in r.embeddings[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("path, body, status, error", [
    ("/api/embed", {"model": "all-minilm", "input": 3}, 400, "invalid input type"),
    ("/api/embed", {"model": "all-minilm", "input": ["a", 1]}, 400, "invalid input type"),
    ("/api/embed", {"input": "x"}, 404, "model '' not found"),
    ("/api/embed", {"model": "nope", "input": "x"}, 404, 'model "nope" not found, try pulling it first'),
    ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
    ("/api/chat", {"model": "all-minilm", "messages": [{"role": "user", "content": "hi"}]}, 400,
     '"all-minilm" does not support chat'),
    ("/api/generate", {"model": "all-minilm", "prompt": "hi"}, 400, '"all-minilm" does not support generate'),
])
def test_errors(daemon, path, body, status, error):
    r = httpx.post(daemon.url + path, json=body, timeout=60)
    assert r.status_code == status and r.json() == {"error": error}


def test_show_reports_the_embedding_capability(client):
    info = client.show("all-minilm")
    assert info.capabilities == ["embedding"]
    assert info.modelinfo["general.architecture"] == "bert"
    assert info.modelinfo["bert.embedding_length"] == 384
    assert "embedding" not in client.show("tiny:scripted").capabilities  # as Ollama: it embeds all the same


def test_an_encoder_runs_on_one_thread_of_its_own_that_ends_at_close():
    """Not the event loop's executor, whose threads live on with an OpenMP pool each
    (scheduler.in_own_thread): one worker per embedding model, ended when it unloads."""
    import asyncio
    import threading

    import torch

    from daemon.backends.runtime import EmbeddingRuntime

    class Recorder:
        threads: list = []

        def embed(self, texts, truncate):
            self.threads.append(threading.current_thread())
            return texts

    recorder = Recorder()
    runtime = EmbeddingRuntime(None, recorder, torch.device("cpu"), 0, 8, 8, 0.0)

    async def twice():
        return [await runtime.embed(["a"], True), await asyncio.to_thread(lambda: None), await runtime.embed(["b"], True)]

    assert asyncio.run(twice())[::2] == [["a"], ["b"]]
    first, second = recorder.threads
    assert first is second and first.name.startswith("embed") and first is not threading.main_thread()
    runtime.close()
    assert not first.is_alive()
