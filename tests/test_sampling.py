import math

import pytest
import torch

from daemon.engine.params import SamplingParams
from daemon.engine.sampling import (SamplingBatch, apply_penalties, counter_uniform, min_p_keep, sample,
                                    token_logprobs, top_k_candidates, top_p_keep, typical_keep)

CPU = torch.device("cpu")


def batch(*params):
    return SamplingBatch.from_params(list(params), CPU)


def test_counter_uniform_is_deterministic_and_uniform():
    ids = torch.arange(20000)[None]
    u = counter_uniform(torch.tensor([7]), torch.tensor([3]), ids)
    assert torch.equal(u, counter_uniform(torch.tensor([7]), torch.tensor([3]), ids))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200
    other = counter_uniform(torch.tensor([8]), torch.tensor([3]), ids)
    assert not torch.equal(u, other)
    assert torch.corrcoef(torch.stack([u[0], other[0]]))[0, 1].abs() < 0.05


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(4000, 1)
    seeds = torch.arange(4000)
    b = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=int(s)) for s in seeds],
                                  CPU)
    tokens = sample(logits, b, torch.zeros(4000, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_greedy_rows_and_sampled_rows_share_a_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    b = batch(SamplingParams(temperature=0), SamplingParams(temperature=100, top_k=0, top_p=1, seed=1))
    out = sample(logits, b, torch.tensor([0, 0]))
    assert out[0] == 1


def test_same_seed_same_token_whatever_the_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(3, 500)
    p = SamplingParams(temperature=1.2, seed=99)
    alone = sample(logits[1:2], batch(p), torch.tensor([5]))
    together = sample(logits, batch(SamplingParams(seed=1), p, SamplingParams(temperature=0)), torch.tensor([0, 5, 9]))
    assert together[1] == alone[0]


def test_top_k_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    values, idx = top_k_candidates(logits, torch.tensor([2, 0]))
    assert idx[0, :2].tolist() == [1, 2] and math.isinf(values[0, 2])
    assert not torch.isinf(values[1]).any() and idx.shape[1] == 4


def test_top_p_min_p_typical_masks():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_keep(probs, torch.tensor([0.7])).tolist() == [[True, True, False, False]]
    assert top_p_keep(probs, torch.tensor([0.01])).tolist() == [[True, False, False, False]]
    assert top_p_keep(probs, torch.tensor([1.0])).all()
    assert min_p_keep(probs, torch.tensor([0.25])).tolist() == [[True, True, True, False]]
    assert typical_keep(probs, torch.tensor([1.0])).all()
    assert typical_keep(probs, torch.tensor([0.2])).sum() == 1


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 2.0, 0.5]])
    window = torch.tensor([[0, 1, 0, -1]])
    b = batch(SamplingParams(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    out = apply_penalties(logits, window, b)
    assert out[0].tolist() == pytest.approx([2.0 / 2 - 0.5 - 0.5, -2.0 * 2 - 0.5 - 0.25, 2.0, 0.5])


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9]])
    b = batch(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert sample(logits, b, torch.tensor([0]), torch.tensor([[0]])).item() == 1
    assert sample(logits, batch(SamplingParams(temperature=0)), torch.tensor([0])).item() == 0


def test_token_logprobs():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    chosen, top_v, top_i = token_logprobs(logits, torch.tensor([1]), 2)
    assert chosen.item() == pytest.approx(math.log(0.75))
    assert top_i[0].tolist() == [1, 0]
