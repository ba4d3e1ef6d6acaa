"""GET /metrics: parsed with prometheus_client's own parser, and moving as requests, loads,
evictions and pulls happen."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hubserver
from conftest import make_settings, run_daemon


@pytest.fixture(scope="module")
def hub(tiny_dirs):
    yield from hubserver.start(hubserver.HubServer(repos={"org/tiny": hubserver.Repo.from_folder(tiny_dirs["scripted"])}))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_dirs, hub):
    # one model at a time: a second one evicts the first
    settings = make_settings(tmp_path_factory.mktemp("metrics"), tiny_dirs, max_loaded_models=1, hf_endpoint=hub.url)
    yield from run_daemon(settings)


def scrape(daemon) -> dict[tuple[str, tuple], float]:
    r = httpx.get(daemon.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name: str, **labels) -> float:
    """Summed over the labels not given."""
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def generate(daemon, model="tiny:scripted", prompt="hi", **extra):
    r = httpx.post(daemon.url + "/api/generate", json={"model": model, "prompt": prompt, "stream": False, **extra},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_names_follow_prometheus_conventions(daemon):
    generate(daemon)
    samples = scrape(daemon)
    names = {n for n, _ in samples}
    for name in ("hfollama_requests_total", "hfollama_request_duration_seconds_bucket",
                 "hfollama_time_to_first_token_seconds_bucket", "hfollama_time_per_output_token_seconds_bucket",
                 "hfollama_generation_tokens_per_second_bucket", "hfollama_prompt_tokens_total",
                 "hfollama_prompt_tokens_cached_total", "hfollama_generation_tokens_total",
                 "hfollama_prefix_cache_requests_total", "hfollama_queue_depth", "hfollama_queue_wait_seconds_bucket",
                 "hfollama_sequences_running", "hfollama_sequences_waiting", "hfollama_kv_slots",
                 "hfollama_kv_cached_tokens", "hfollama_model_loaded", "hfollama_model_memory_bytes",
                 "hfollama_model_loads_total", "hfollama_model_load_duration_seconds_bucket",
                 "hfollama_memory_budget_bytes", "hfollama_pull_bytes_total", "process_resident_memory_bytes"):
        assert name in names, name
    assert all(n.startswith(("hfollama_", "process_")) for n in names)


def test_requests_tokens_and_latencies_move(daemon):
    before = scrape(daemon)
    answers = [generate(daemon, prompt=f"count {i}") for i in range(3)]
    httpx.get(daemon.url + "/api/tags")
    httpx.post(daemon.url + "/api/generate", json={"model": "no-such-model", "prompt": "x"})
    after = scrape(daemon)
    moved = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    assert moved("hfollama_requests_total", route="/api/generate", status="200", method="POST") == 3
    assert moved("hfollama_requests_total", route="/api/generate", status="404") == 1
    assert moved("hfollama_requests_total", route="/api/tags", status="200") == 1
    assert moved("hfollama_generation_tokens_total", model="tiny:scripted") == sum(a["eval_count"] for a in answers)
    evaluated = sum(a["prompt_eval_count"] for a in answers)
    assert moved("hfollama_prompt_tokens_total") - moved("hfollama_prompt_tokens_cached_total") == evaluated
    assert moved("hfollama_time_to_first_token_seconds_count", model="tiny:scripted") == 3
    assert moved("hfollama_time_per_output_token_seconds_count", model="tiny:scripted") == 3
    assert moved("hfollama_request_duration_seconds_count", route="/api/generate") == 4
    # a histogram's buckets are cumulative and end in +Inf = count
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in after.items()
                     if n == "hfollama_time_to_first_token_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == total(after, "hfollama_time_to_first_token_seconds_count")


def test_a_repeated_prompt_is_a_prefix_cache_hit(daemon):
    generate(daemon, prompt="the same prompt")
    before = scrape(daemon)
    generate(daemon, prompt="the same prompt")
    after = scrape(daemon)
    assert total(after, "hfollama_prefix_cache_requests_total", result="hit") == \
        total(before, "hfollama_prefix_cache_requests_total", result="hit") + 1
    assert total(after, "hfollama_prompt_tokens_cached_total") > total(before, "hfollama_prompt_tokens_cached_total")
    assert value(after, "hfollama_kv_slots", model="tiny:scripted") == 4
    assert value(after, "hfollama_kv_cached_tokens", model="tiny:scripted") > 0
    assert value(after, "hfollama_model_loaded", model="tiny:scripted", device="cpu") == 1
    assert value(after, "hfollama_model_memory_bytes", model="tiny:scripted", device="cpu") > 0


def test_loads_evictions_and_unloads_are_counted(daemon):
    generate(daemon)  # tiny:scripted loaded
    before = scrape(daemon)
    generate(daemon, model="tiny:random", options={"num_predict": 2})  # one model at most: evicts scripted
    mid = scrape(daemon)
    assert total(mid, "hfollama_model_loads_total", model="tiny:random", result="success") == \
        total(before, "hfollama_model_loads_total", model="tiny:random", result="success") + 1
    assert total(mid, "hfollama_model_unloads_total", model="tiny:scripted", reason="evicted") == \
        total(before, "hfollama_model_unloads_total", model="tiny:scripted", reason="evicted") + 1
    assert total(mid, "hfollama_model_load_duration_seconds_count", model="tiny:random") >= 1
    assert total(mid, "hfollama_queue_wait_seconds_count") > total(before, "hfollama_queue_wait_seconds_count")
    assert value(mid, "hfollama_model_loaded", model="tiny:random", device="cpu") == 1
    assert value(mid, "hfollama_model_loaded", model="tiny:scripted", device="cpu") == 0
    httpx.post(daemon.url + "/api/generate", json={"model": "tiny:random", "keep_alive": 0})
    after = scrape(daemon)
    assert total(after, "hfollama_model_unloads_total", model="tiny:random", reason="requested") == \
        total(mid, "hfollama_model_unloads_total", model="tiny:random", reason="requested") + 1
    assert not any(n == "hfollama_model_loaded" for n, _ in after)


def test_running_and_waiting_sequences_and_the_queue_while_busy(daemon):
    """Six streams held open against four slots: the gauges must show four running and the rest waiting.
    Greedy decoding on random weights with no length limit, so no stream ends (EOS or length) before the
    scrape sees the state; the streams are dropped only after it has."""
    body = {"model": "tiny:random", "prompt": "go", "options": {"num_predict": 100000, "temperature": 0}}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            release = asyncio.Event()

            async def hold():
                async with client.stream("POST", daemon.url + "/api/generate", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        assert '"error"' not in line, line
                        if release.is_set():
                            return
                raise AssertionError("a stream ended before the scrape saw six requests at once")

            tasks = [asyncio.create_task(hold()) for _ in range(6)]
            seen = {}
            for _ in range(600):
                s = await asyncio.to_thread(scrape, daemon)
                seen = {"running": value(s, "hfollama_sequences_running", model="tiny:random"),
                        "waiting": value(s, "hfollama_sequences_waiting", model="tiny:random")}
                if seen == {"running": 4, "waiting": 2} or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.02)
            release.set()
            await asyncio.gather(*tasks)
            return seen
    assert asyncio.run(burst()) == {"running": 4, "waiting": 2}  # four slots, six requests


def test_pulls_count_bytes_and_failures(daemon):
    before = scrape(daemon)
    r = httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/org/tiny"}, timeout=120)
    assert r.status_code == 200 and '"success"' in r.text
    r = httpx.post(daemon.url + "/api/pull", json={"model": "hf.co/org/missing"}, timeout=120)
    assert '"error"' in r.text
    after = scrape(daemon)
    assert total(after, "hfollama_pulls_total", result="success") == total(before, "hfollama_pulls_total",
                                                                          result="success") + 1
    assert total(after, "hfollama_pulls_total", result="failure") == total(before, "hfollama_pulls_total",
                                                                          result="failure") + 1
    assert value(after, "hfollama_pull_bytes_total") > value(before, "hfollama_pull_bytes_total") + 10_000


def test_two_apps_count_apart(tmp_path, tiny_dirs, daemon):
    for other in run_daemon(make_settings(tmp_path, tiny_dirs)):
        assert total(scrape(other), "hfollama_requests_total", route="/api/generate") == 0
