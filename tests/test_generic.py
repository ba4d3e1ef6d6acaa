"""Architectures without a model definition (GPT-2, OPT, Falcon) run through transformers' own
forward (engine/generic.py): greedy-identical to generate(), alone and beside another request
in the same runner."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import families
from daemon.engine.generic import TransformersForward
from daemon.engine.runner import Runner


@pytest.fixture(scope="module")
def generic_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic")
    return {f: families.build(root / f, f) for f in families.GENERIC}


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", families.GENERIC)
def test_greedy_equals_generate(generic_dirs, family):
    expected = families.hf_greedy(generic_dirs[family])
    assert families.our_greedy(TransformersForward(load(generic_dirs[family]), num_slots=2, max_ctx=128)) == expected


collect = families.runner_greedy


@pytest.mark.parametrize("family", families.GENERIC)
def test_in_the_runner_alone_and_beside_another_request(generic_dirs, family):
    path = generic_dirs[family]
    expected = families.hf_greedy(path, n=24)
    tok = AutoTokenizer.from_pretrained(path)
    runner = Runner(TransformersForward(load(path), num_slots=2, max_ctx=128), tok, [], prefill_chunk=4)
    try:
        assert asyncio.run(collect(runner, families.PROMPT, 24)) == expected

        async def together():
            return await asyncio.gather(collect(runner, families.PROMPT, 24), collect(runner, [40, 41, 42, 43, 44], 30))
        alone_other = asyncio.run(collect(runner, [40, 41, 42, 43, 44], 30))
        assert asyncio.run(together()) == [expected, alone_other]
        # a slot reused from the start, and one continued after a step it discarded
        assert asyncio.run(collect(runner, families.PROMPT, 24)) == expected
    finally:
        runner.close()


@pytest.mark.parametrize("family", ["gemma3-vision", "llava", "llava-next", "qwen2.5-vl"])
def test_images_through_transformers_forward_decode_as_generate(tmp_path, family):
    """A vision model on this path (for one whose language model has no definition here): the
    image's rows as inputs_embeds and, for Gemma 3, token type ids from the sequence's start, so
    its image tokens see each other; for Qwen2.5-VL, its multimodal rotary positions given (the
    decode steps' shifted past the image); greedy tokens equal transformers' generate()."""
    import hashlib
    import io

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    import visionmodels as vm
    from daemon.engine.images import ImageBytes
    from daemon.engine.vision import Vision

    path = vm.build(tmp_path / family, family)
    data = vm.picture(seed=1)
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    expected = vm.hf_greedy(path, message, [data], n=10)
    processor = vm.processor_of(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    forward = TransformersForward(model, num_slots=2, max_ctx=256)
    forward.vision = vision = Vision(model, processor, forward.vocab_size)
    tokens, pixels = vision.prepare(ImageBytes(data, hashlib.sha256(data).hexdigest()))
    vision.encode(tokens, pixels)
    text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    ids = vision.substitute(processor(text=text, images=[picture], add_special_tokens=False)["input_ids"][0], [tokens])
    logits = forward.forward(torch.tensor([ids]), [0], [0])
    first = torch.log_softmax(logits[0], dim=-1)
    assert torch.allclose(first, vm.hf_first_logprobs(path, message, [data]), atol=1e-4)
    out = []
    for step in range(10):
        out.append(int(logits[0].argmax()))
        logits = forward.forward(torch.tensor([[out[-1]]]), [0], [len(ids) + step])
    assert out == expected
