"""Images through vision models (engine/vision.py), end to end on the CPU: tiny random Gemma 3,
LLaVA and Qwen2.5-VL checkpoints with their processors (visionmodels.py) served by a live daemon, compared with
transformers' own generate() on the processor's output."""

from __future__ import annotations

import base64
import json
import math

import httpx
import pytest
import torch

import visionmodels as vm
from conftest import run_daemon
from daemon.config import Settings, parse_host

GEMMA, LLAVA, QWEN = "tiny:gemma3-vision", "tiny:llava", "tiny:qwen2.5-vl"
MODELS = {"gemma3-vision": GEMMA, "llava": LLAVA, "llava-next": "tiny:llava-next", "qwen2.5-vl": QWEN}
QUESTION = "What is this?"
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {family: vm.build(root / family, family, seed=0) for family in vm.VISION}


@pytest.fixture(scope="module")
def served(tmp_path_factory, vision_dirs, tiny_dirs):
    root = tmp_path_factory.mktemp("vision-daemon")
    modelfiles = root / "modelfiles"
    modelfiles.mkdir()
    paths = {**vision_dirs, "text": tiny_dirs["random"]}
    tags = "".join(f"  {tag}:\n    source: {{path: '{path}'}}\n" for tag, path in paths.items())
    (modelfiles / "tiny.yaml").write_text("family: tiny\ntags:\n" + tags)
    settings = Settings.from_env({}, bind=parse_host("127.0.0.1:0"), models_dir=root / "models",
                                 user_modelfiles_dir=modelfiles, context_length=1024, num_parallel=4, device="cpu")
    yield from run_daemon(settings)


def post(daemon, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(daemon.url + path, content=json.dumps(body), timeout=timeout)


def image_message(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def generated(daemon, model: str, images: list[bytes], **extra) -> tuple[list[int], dict]:
    """Greedy /api/generate: the ids it generated (from `context`) and the final line."""
    body = {"model": model, "prompt": QUESTION, "images": [vm.b64(i) for i in images], "stream": False,
            "options": GREEDY, **extra}
    r = post(daemon, "/api/generate", body)
    assert r.status_code == 200, r.text
    final = r.json()
    return final["context"][-final["eval_count"]:], final


@pytest.mark.parametrize("family", vm.VISION)
def test_an_image_gives_transformers_greedy_tokens(served, vision_dirs, family):
    image = vm.picture(seed=1)
    expected = vm.hf_greedy(vision_dirs[family], image_message(), [image], n=GREEDY["num_predict"])
    ours, final = generated(served, MODELS[family], [image])
    assert ours == expected
    # what was evaluated: the template's text and every image token (4 for Gemma, 16 for LLaVA,
    # LLaVA-NeXT's 16 for the whole picture and its tiles' more, 48 x 40 pixels in 8-pixel
    # patches merged 2 x 2 for Qwen: 3 x 3)
    assert final["prompt_eval_count"] > {"gemma3-vision": 4, "llava": 16, "llava-next": 32, "qwen2.5-vl": 9}[family]


@pytest.mark.parametrize("family", vm.VISION)
def test_first_token_logprobs_are_transformers(served, vision_dirs, family):
    """The whole distribution of the first answer token, which any difference in how the image
    is placed or attended moves (Gemma 3's image tokens see each other: without that, 1e-2 off)."""
    image = vm.picture(seed=12)
    expected = vm.hf_first_logprobs(vision_dirs[family], image_message(), [image])
    body = {"model": MODELS[family], "prompt": QUESTION, "images": [vm.b64(image)], "stream": False,
            "logprobs": True, "top_logprobs": 8, "options": {**GREEDY, "num_predict": 1}}
    r = post(served, "/api/generate", body)
    assert r.status_code == 200, r.text
    top = r.json()["logprobs"][0]["top_logprobs"]
    best = expected.topk(8)
    assert [round(t["logprob"], 3) for t in top] == pytest.approx([round(v, 3) for v in best.values.tolist()],
                                                                   abs=2e-3)


@pytest.mark.parametrize("family", vm.VISION)
def test_the_prompt_is_the_processors(served, vision_dirs, family):
    """Our ids for a chat with images are the processor's ids for the rendered chat (its image
    tokens as virtual ids), so the prompt the model sees is the one transformers builds."""
    import io

    from PIL import Image

    images = [vm.picture(seed=2), vm.picture(30, 70, seed=3)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "one"}]},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "two"}]}]
    processor = vm.processor_of(vision_dirs[family])
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pictures = [Image.open(io.BytesIO(i)).convert("RGB") for i in images]
    expected = processor(text=text, images=pictures, add_special_tokens=False)["input_ids"][0]

    runtime = served.call(_runtime(served, MODELS[family]))
    from daemon.engine.prompt import ContextBudget, with_images

    tokens, held = served.call(runtime.image_tokens([vm.b64(i) for i in images]))
    try:
        wire = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "two"}]
        placed = [with_images(wire[0], tokens[:1]), wire[1], with_images(wire[2], tokens[1:])]
        ids = runtime.prompts.chat_ids(placed, ContextBudget(1024))
    finally:
        runtime.vision.unpin(held)
    image_id = runtime.vision.image_token_id
    assert [image_id if t >= runtime.vision.first_virtual else t for t in ids] == expected
    virtual = [t for t in ids if t >= runtime.vision.first_virtual]
    assert virtual == list(tokens[0].ids) + list(tokens[1].ids)


# what each family's own chat template writes for an image (visionmodels' templates, as the real ones)
TEMPLATE_IMAGE = {"gemma3-vision": "<start_of_image>", "llava": "<image>", "llava-next": "<image>",
                  "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>"}
GO_TEMPLATE = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


@pytest.mark.parametrize("family", vm.VISION)
def test_go_templates_and_raw_prompts_place_images_as_the_models_template(served, vision_dirs, family):
    """Where a Go template (a request's own, an imported Ollama modelfile's) or a raw prompt
    places an image, the prompt holds what the model's own template writes for one: Qwen's
    image pads inside its vision start / end markers, as Ollama's qwen25vl model adds them."""
    import io

    from PIL import Image

    image = vm.picture(seed=4)
    processor = vm.processor_of(vision_dirs[family])
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    written = TEMPLATE_IMAGE[family]
    runtime = served.call(_runtime(served, MODELS[family]))
    from daemon.engine.prompt import ContextBudget

    tokens, held = served.call(runtime.image_tokens([vm.b64(image)]))
    try:
        go = runtime.prompts.generate_ids(QUESTION, ContextBudget(1024), template=GO_TEMPLATE, images=tokens)
        raw = runtime.prompts.generate_ids(QUESTION, ContextBudget(1024), raw=True, images=tokens)
    finally:
        runtime.vision.unpin(held)
    image_id = runtime.vision.image_token_id
    for ids, text, special in ((go, f"<|im_start|>user\n{written}{QUESTION}<|im_end|>\n<|im_start|>assistant\n", False),
                               (raw, written + QUESTION, True)):
        expected = processor(text=text, images=[picture], add_special_tokens=special)["input_ids"][0]
        assert [image_id if t >= runtime.vision.first_virtual else t for t in ids] == list(expected)


@pytest.mark.parametrize("family", vm.VISION)
def test_a_conversation_with_two_pictures_decodes_as_generate(served, vision_dirs, family):
    """Two pictures in two turns through /api/chat: generate()'s answer (Qwen2.5-VL: the text
    after each picture placed where the picture's rows and columns end); sent again with a new
    last turn, the cached prefix (both pictures) is reused and the answer is still generate()'s."""
    first, second = vm.picture(seed=20), vm.picture(64, 40, seed=21)

    def hf_text(turns: list[tuple[str, bytes | None]], answers: list[str]) -> str:
        messages, images = [], []
        for i, (text, image) in enumerate(turns):
            parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": parts})
            images += [image] if image else []
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        runtime = served.call(_runtime(served, MODELS[family]))
        ids = vm.hf_greedy(vision_dirs[family], messages, images, n=GREEDY["num_predict"])
        return runtime.loaded.tokenizer.decode(ids, skip_special_tokens=False)

    def chat(turns: list[tuple[str, bytes | None]], answers: list[str]) -> dict:
        messages = []
        for i, (text, image) in enumerate(turns):
            messages.append({"role": "user", "content": text, **({"images": [vm.b64(image)]} if image else {})})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        r = post(served, "/api/chat", {"model": MODELS[family], "stream": False, "options": GREEDY,
                                       "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()

    turns = [("one", first), ("and this?", second)]
    reply = chat(turns, ["yes"])
    assert reply["message"]["content"] == hf_text(turns, ["yes"])
    turns.append(("compare them", None))
    answers = ["yes", reply["message"]["content"]]
    again = chat(turns, answers)
    assert again["message"]["content"] == hf_text(turns, answers)
    assert again["prompt_eval_count"] < reply["prompt_eval_count"]  # both pictures came from the cache


async def _runtime(daemon, model: str):
    """The loaded runtime of `model` (loading it if it is not)."""
    from daemon.names import ModelName

    svc = daemon.services
    async with svc.models.acquire(svc.catalog.resolve(ModelName.parse(model)), None, None) as runtime:
        return runtime


def test_chat_and_v1_give_the_same_tokens_as_generate(served):
    image = vm.picture(seed=4)
    ours, _ = generated(served, LLAVA, [image])
    r = post(served, "/api/chat", {"model": LLAVA, "stream": False, "options": GREEDY,
                                   "messages": [{"role": "user", "content": QUESTION, "images": [vm.b64(image)]}]})
    assert r.status_code == 200, r.text
    runtime = served.call(_runtime(served, LLAVA))
    text = runtime.loaded.tokenizer.decode(ours, skip_special_tokens=False)
    assert r.json()["message"]["content"] == text
    url = "data:image/png;base64," + vm.b64(image)
    r = post(served, "/v1/chat/completions", {
        "model": LLAVA, "temperature": 0, "max_tokens": GREEDY["num_predict"],
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": QUESTION}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == text


def test_the_image_decides_the_answer_and_a_resend_reuses_its_cache(served):
    """Two pictures, two first-token distributions; the same picture sent again in the next
    request reuses the cached prompt (its virtual ids match) and answers the same."""
    def first_logprobs(image: bytes) -> tuple[dict, dict]:
        body = {"model": GEMMA, "prompt": QUESTION, "images": [vm.b64(image)], "stream": False,
                "logprobs": True, "top_logprobs": 5, "options": {**GREEDY, "num_predict": 1}}
        r = post(served, "/api/generate", body)
        assert r.status_code == 200, r.text
        return {t["token"]: t["logprob"] for t in r.json()["logprobs"][0]["top_logprobs"]}, r.json()

    a, first = first_logprobs(vm.picture(seed=5))
    b, _ = first_logprobs(vm.picture(seed=6))
    assert a != b
    again, resend = first_logprobs(vm.picture(seed=5))
    assert again.keys() == a.keys() and all(math.isclose(again[k], a[k], abs_tol=1e-4) for k in a)
    assert resend["prompt_eval_count"] < first["prompt_eval_count"]  # the prefix cache held it


def test_a_text_request_beside_an_image_request_is_unchanged(served):
    text_body = {"model": LLAVA, "prompt": "Tell me a story", "stream": False, "options": {**GREEDY, "num_predict": 24}}
    alone = post(served, "/api/generate", text_body).json()["context"]

    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            image_body = {"model": LLAVA, "prompt": QUESTION, "images": [vm.b64(vm.picture(seed=7))],
                          "stream": False, "options": {**GREEDY, "num_predict": 24}}
            import asyncio
            return await asyncio.gather(client.post(served.url + "/api/generate", json=image_body),
                                        client.post(served.url + "/api/generate", json=text_body))

    import asyncio
    image_reply, text_reply = asyncio.run(both())
    assert image_reply.status_code == 200 and text_reply.status_code == 200
    assert text_reply.json()["context"] == alone


def test_ps_shows_the_images_held(served):
    generated(served, GEMMA, [vm.picture(seed=31)])
    models = {m["name"]: m for m in httpx.get(served.url + "/api/ps").json()["models"]}
    images = models[GEMMA]["images"]
    assert images["held"] >= 1 and 0 < images["bytes"] <= images["budget"]
    assert "images" not in models.get("tiny:text", {})


def test_show_lists_vision(served):
    caps = post(served, "/api/show", {"model": GEMMA}).json()["capabilities"]
    assert caps[:2] == ["completion", "vision"]
    assert "vision" not in post(served, "/api/show", {"model": "tiny:text"}).json()["capabilities"]


def test_official_clients(served, tmp_path):
    import ollama
    import openai

    path = tmp_path / "picture.png"
    path.write_bytes(vm.picture(seed=8))
    client = ollama.Client(host=served.url)
    answer = client.chat(model=LLAVA, options=GREEDY,
                         messages=[{"role": "user", "content": QUESTION, "images": [str(path)]}])
    via_generate = client.generate(model=LLAVA, prompt=QUESTION, images=[path], options=GREEDY)
    assert answer.message.content and via_generate.response
    oa = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    completion = oa.chat.completions.create(model=LLAVA, temperature=0, max_tokens=GREEDY["num_predict"], messages=[
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert completion.choices[0].message.content == answer.message.content


def _png_truncated() -> str:
    return vm.b64(vm.picture(64, 64, seed=9)[:200])


def _gif_animated() -> str:
    import io

    from PIL import Image

    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return vm.b64(buffer.getvalue())


def _huge_png() -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")  # a few KB of file, 400 megapixels
    return vm.b64(buffer.getvalue())


BAD_IMAGES = [
    ("not base64", lambda: "data:image/png;base64,AAAA", "illegal base64 data at input byte 4"),
    ("not an image", lambda: vm.b64(b"hello, this is text and not a picture"), "not a supported image format"),
    ("truncated PNG", _png_truncated, "invalid image data"),
    ("20000 x 20000", _huge_png, "image too large"),
    ("100 images", None, "too many images (100)"),
]


@pytest.mark.parametrize("what,make,message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
@pytest.mark.parametrize("endpoint", ["/api/generate", "/api/chat"])
def test_bad_images_are_400s_and_the_daemon_keeps_serving(served, what, make, message, endpoint):
    images = [vm.b64(vm.picture(8, 8, seed=i)) for i in range(100)] if make is None else [make()]
    if endpoint == "/api/generate":
        body = {"model": GEMMA, "prompt": QUESTION, "images": images, "stream": False}
    else:
        body = {"model": GEMMA, "stream": False, "messages": [{"role": "user", "content": QUESTION, "images": images}]}
    r = post(served, endpoint, body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    ok, _ = generated(served, GEMMA, [vm.picture(seed=10)])
    assert len(ok) == GREEDY["num_predict"]


def test_an_animated_gif_gives_its_first_frame(served):
    ours, _ = generated(served, GEMMA, [base64.b64decode(_gif_animated())])
    import io

    from PIL import Image

    first = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(first, format="PNG")
    assert ours == generated(served, GEMMA, [first.getvalue()])[0]


def test_an_image_for_a_text_model_is_ollamas_400(served):
    r = post(served, "/api/generate", {"model": "tiny:text", "prompt": QUESTION, "images": [vm.b64(vm.picture())],
                                       "stream": False})
    assert r.status_code == 400
    assert "does not support vision" in r.json()["error"]


def test_a_context_naming_a_forgotten_image_is_a_400(served):
    runtime = served.call(_runtime(served, GEMMA))
    stale = runtime.vision.first_virtual + 10_000_000
    r = post(served, "/api/generate", {"model": GEMMA, "prompt": QUESTION, "context": [5, stale], "stream": False})
    assert r.status_code == 400, r.text
    assert "past the model's vocabulary" in r.json()["error"] or "no longer held" in r.json()["error"]


def test_features_are_pinned_while_used_and_evicted_after(served, monkeypatch):
    from daemon.engine import vision as vision_module

    runtime = served.call(_runtime(served, GEMMA))
    vision = runtime.vision
    monkeypatch.setattr(vision_module, "FEATURES_BUDGET", 0)
    tokens, held = served.call(runtime.image_tokens([vm.b64(vm.picture(seed=11))]))
    assert vision.has_features(tokens[0])  # pinned: kept over a budget of nothing
    vision.unpin(held)
    assert not vision.has_features(tokens[0])
    assert torch.is_tensor(vision.embed(torch.tensor([5]), lambda ids: torch.zeros(1, 4)))


def test_forgotten_images_give_their_ids_up_for_good(served, monkeypatch):
    """Past KNOWN_IMAGES the oldest unpinned image is forgotten: a `context` naming its ids is a
    400, and the same picture sent again gets new ids (nothing cached can match the old ones)."""
    from daemon.engine import vision as vision_module

    runtime = served.call(_runtime(served, LLAVA))
    vision = runtime.vision
    monkeypatch.setattr(vision_module, "KNOWN_IMAGES", 1)
    tokens, held = served.call(runtime.image_tokens([vm.b64(vm.picture(seed=20))]))
    vision.unpin(held)
    later, held = served.call(runtime.image_tokens([vm.b64(vm.picture(seed=21))]))
    vision.unpin(held)
    with pytest.raises(Exception, match="past the model's vocabulary"):
        vision.pin([tokens[0].first])
    again, held = served.call(runtime.image_tokens([vm.b64(vm.picture(seed=20))]))
    vision.unpin(held)
    assert again[0].first > later[0].first > tokens[0].first


@pytest.mark.parametrize("family", vm.VISION)
def test_the_warm_up_picture_is_forgotten(served, family):
    """The load's warm-up image (on a GPU) runs the processor and tower and leaves nothing held:
    no features, no pins; the next request's image is encoded as its own."""
    runtime = served.call(_runtime(served, MODELS[family]))
    vision = runtime.vision
    held = dict(vision._features)
    served.call(_exclusive(runtime, vision.warm_up))
    assert dict(vision._features).keys() == held.keys() and not vision._pins
    ours, _ = generated(served, MODELS[family], [vm.picture(seed=30)])
    assert len(ours) == GREEDY["num_predict"]


async def _exclusive(runtime, fn):
    return await runtime.runner.run_exclusive(fn)
