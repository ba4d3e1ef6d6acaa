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
