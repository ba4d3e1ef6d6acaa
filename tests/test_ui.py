"""The chat page at /ui, in a real headless Chromium driven by Playwright: streaming into the
page, stop (the server's slot frees), the models view's pull bar, unload, the conversation
kept in the browser. Screenshots land in tests/screenshots/. Skipped where no browser is
installed (`make test` installs Debian's chromium where it can)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

import hubserver
from conftest import make_settings, run_daemon
from tinymodels import SCRIPT_TEXT

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
CHROMIUM = os.environ.get("HFOLLAMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `apt install chromium` (make test does it "
                                                         "where it can), or HFOLLAMA_CHROMIUM=/path/to/chrome")
SHOTS = Path(__file__).resolve().parent / "screenshots"
# what a closed network needs: no background connections, no sandbox as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def hub(tiny_dirs):
    yield from hubserver.start(hubserver.HubServer(repos={"org/tiny": hubserver.Repo.from_folder(tiny_dirs["scripted"])}))


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_dirs, hub):
    """A daemon with the tiny models and the tests' Hub, for the models view."""
    yield from run_daemon(make_settings(tmp_path_factory.mktemp("ui"), tiny_dirs, hf_endpoint=hub.url))


class Page:
    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 820})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())
        self.page.goto(url + "/ui")

    def wait_for_model(self, name: str) -> None:
        self.page.wait_for_selector(f'#model option[value="{name}"]', state="attached", timeout=30_000)

    def choose(self, model: str, **options) -> None:
        self.wait_for_model(model)
        self.page.select_option("#model", model)
        self.page.click("#settings summary")
        for name, value in options.items():
            self.page.fill(f"#opt-{name}", str(value))

    def say(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def reply(self) -> str:
        return self.page.inner_text(".message.assistant:last-child .content")

    def wait_done(self, timeout: float = 120) -> None:
        self.page.wait_for_selector("#stop", state="hidden", timeout=timeout * 1000)

    def __enter__(self) -> "Page":
        return self

    def __exit__(self, *exc) -> None:
        self.context.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.page.screenshot(path=str(SHOTS / f"{name}.png"))


def test_the_page_loads_with_no_console_errors_and_root_still_answers_clients(browser, daemon):
    assert httpx.get(daemon.url + "/").text == "Ollama is running"
    r = httpx.get(daemon.url + "/ui")
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(daemon.url + "/ui/nothing.js").status_code == 404
    with Page(browser, daemon.url) as page:
        page.wait_for_model("smollm2:135m")
        assert page.errors == []


@pytest.mark.slow
def test_a_message_to_smollm2_streams_into_the_page(browser, daemon):
    with Page(browser, daemon.url) as page:
        page.choose("smollm2:135m", temperature=0, num_predict=48, seed=1)
        page.say("Write a short poem about the sea.")
        page.page.wait_for_selector(".message.assistant", timeout=30_000)
        seen = []
        deadline = time.time() + 180
        while page.page.is_visible("#stop") and time.time() < deadline:
            text = page.reply()
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            time.sleep(0.01)
        page.wait_done()
        final = page.reply()
        assert len(seen) >= 3 and all(final.startswith(s.rstrip()[:20]) for s in seen), seen  # it grew in place
        assert "tokens/s" in page.page.inner_text("#status")
        answer = httpx.post(daemon.url + "/api/chat", timeout=120, json={
            "model": "smollm2:135m", "stream": False, "options": {"temperature": 0, "num_predict": 48, "seed": 1},
            "messages": [{"role": "user", "content": "Write a short poem about the sea."}]}).json()
        # rendered as Markdown: compare the words
        assert final.split() == answer["message"]["content"].split()
        assert page.errors == []
        shot(page, "chat")


@pytest.mark.slow
def test_stop_cancels_the_generation_on_the_server(browser, daemon):
    with Page(browser, daemon.url) as page:
        page.choose("smollm2:135m", num_predict=100000)
        page.say("Count from one to one million, one number per line.")
        page.page.wait_for_selector(".message.assistant", timeout=60_000)
        deadline = time.time() + 60
        while len(page.reply()) < 20 and time.time() < deadline:  # (the page's CSP forbids wait_for_function)
            time.sleep(0.05)
        page.page.click("#stop")
        page.wait_done(10)
        assert page.page.inner_text("#status") == "stopped"
        runners = [r.runtime.runner for r in daemon.services.models.residents() if hasattr(r.runtime, "runner")]
        deadline = time.time() + 10
        while any(r.busy for r in runners) and time.time() < deadline:
            time.sleep(0.05)
        assert runners and not any(r.busy for r in runners)  # the slot is free again
        assert page.errors == []


def test_markdown_is_rendered_and_escaped(browser, local):
    with Page(browser, local.url) as page:
        html = page.page.evaluate("""Markdown.render("# Title\\n\\nSome **bold** and `x<y`.\\n\\n```python\\n"""
                                  """print('<b>')\\n```\\n- one\\n- two\\n\\n<script>alert(1)</script> """
                                  """[a](javascript:alert(1)) [b](https://example.org)")""")
        assert "<h3>Title</h3>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
        assert '<pre data-lang="python"><code>print(&#39;&lt;b&gt;&#39;)</code></pre>' in html
        assert "<ul><li>one</li><li>two</li></ul>" in html
        assert "<script>" not in html and 'href="javascript' not in html
        assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer">b</a>' in html


def test_conversations_persist_regenerate_and_edit(browser, local):
    with Page(browser, local.url) as page:
        page.choose("tiny:scripted")
        page.say("hello there")
        page.wait_done()
        assert page.reply() == SCRIPT_TEXT
        page.page.reload()
        page.page.wait_for_selector(".message.assistant", timeout=30_000)
        assert page.page.inner_text("#conversations li .link") == "hello there"
        assert page.page.inner_text(".message.user .content") == "hello there"
        page.page.click("#regenerate")
        page.wait_done()
        assert page.page.locator(".message").count() == 2 and page.reply() == SCRIPT_TEXT
        page.page.click(".message.user .edit")
        assert page.page.locator(".message").count() == 0 and page.page.input_value("#prompt") == "hello there"
        page.page.click("#new-chat")
        assert page.page.locator("#conversations li").count() == 2
        assert page.errors == []


def test_models_view_pull_bar_unload_and_errors(browser, local, hub, tiny_dirs):
    weights = (tiny_dirs["scripted"] / "model.safetensors").stat().st_size
    hub.throttle["model.safetensors"] = weights / 2.5  # about two and a half seconds
    with Page(browser, local.url) as page:
        try:
            page.page.click("#tab-models")
            page.page.fill("#pull-name", "hf.co/org/tiny")
            page.page.click("#pull-start")
            values = []
            deadline = time.time() + 60
            while time.time() < deadline:
                value, top = page.page.evaluate("[document.querySelector('#pull-progress').value, "
                                                "document.querySelector('#pull-progress').max]")
                if not values or values[-1] != value:
                    values.append(value)
                if "success" in page.page.inner_text("#pull-status"):
                    break
                time.sleep(0.05)
            assert "success" in page.page.inner_text("#pull-status")
            partial = [v for v in values if 0 < v < top]
            assert len(partial) >= 3 and partial == sorted(partial), values  # the bar advanced
            page.page.wait_for_selector('#installed tr[data-model="hf.co/org/tiny:latest"]', timeout=10_000)

            page.page.fill("#pull-name", "hf.co/org/missing")
            page.page.click("#pull-start")
            page.page.wait_for_selector("#pull-status.error", timeout=30_000)
            assert "org/missing" in page.page.inner_text("#pull-status")

            httpx.post(local.url + "/api/generate", json={"model": "tiny:scripted", "prompt": "hi", "stream": False})
            page.page.click("#tab-chat")
            page.page.click("#tab-models")
            row = '#loaded tr[data-model="tiny:scripted"]'
            page.page.wait_for_selector(row, timeout=10_000)
            shot(page, "models")
            page.page.click(f"{row} button")
            page.page.wait_for_selector(row, state="detached", timeout=10_000)
            assert httpx.get(local.url + "/api/ps").json()["models"] == []
            assert page.errors == []
        finally:
            hub.throttle.clear()


def test_a_keyed_daemon_asks_for_the_key(browser, tmp_path, tiny_dirs):
    for keyed in run_daemon(make_settings(tmp_path, tiny_dirs, api_keys=("sk-ui-test",))):
        with Page(browser, keyed.url) as page:
            page.page.wait_for_selector("#key-bar", state="visible", timeout=10_000)
            page.page.fill("#key-input", "sk-ui-test")
            page.page.click("#key-save")
            page.wait_for_model("tiny:scripted")
            assert page.page.is_hidden("#key-bar")


def test_a_thinking_model_shows_its_thinking_folded(browser, local):
    from tinymodels import ANSWER_TEXT, THINKING_TEXT

    with Page(browser, local.url) as page:
        page.choose("tiny:thinker")
        page.page.wait_for_selector("#think-label", state="visible", timeout=10_000)
        page.say("think first")
        page.wait_done()
        details = page.page.locator(".message.assistant details.thinking")
        assert details.count() == 1 and details.get_attribute("open") is None  # folded
        folded = page.page.evaluate("document.querySelector('.message.assistant details.thinking div').textContent")
        assert folded.strip() == THINKING_TEXT
        assert page.reply().strip() == ANSWER_TEXT.strip()
        assert page.errors == []
