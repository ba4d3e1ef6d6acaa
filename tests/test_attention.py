"""engine/attention.py: a pass's prompt segments attended together (PromptSegments) against
each segment alone, and prefixes copied into several slots at once."""

import pytest
import torch

from daemon.engine.attention import PromptSegments, attend, copy_slot_prefix

HEADS, KV_HEADS, DIM, SLOTS, CTX = 4, 2, 8, 12, 40


def caches():
    torch.manual_seed(0)
    shape = (SLOTS, KV_HEADS, CTX, DIM)
    return torch.randn(shape), torch.randn(shape)


def alone(q, k, v, segments, **options):
    out, offset = [], 0
    for slot, start, n in segments:
        o = attend(q[offset:offset + n].transpose(0, 1)[None], k[slot:slot + 1, :, :start + n],
                   v[slot:slot + 1, :, :start + n], None, **options)
        out.append(o[0].transpose(0, 1).reshape(n, HEADS * DIM))
        offset += n
    return torch.cat(out)


SEGMENTS = {
    "one": [(3, 0, 7)],
    "same start, in order": [(2, 10, 5), (3, 10, 5)],
    "same start, other lengths, out of order, a gap": [(4, 10, 5), (1, 10, 2), (2, 10, 7)],
    "far apart (gathered)": [(0, 6, 3), (11, 6, 4)],
    "two starts": [(5, 10, 3), (0, 0, 9), (6, 10, 4), (7, 0, 2)],
}
OPTIONS = {"causal": {}, "window": {"window": 4}, "softcap": {"softcap": 5.0}}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
def test_segments_attended_together_as_each_alone(segments, options):
    k, v = caches()
    q = torch.randn(sum(n for _, _, n in segments), HEADS, DIM)
    prompts = PromptSegments(segments, torch.device("cpu"))
    assert len(prompts.groups) == len({start for _, start, _ in segments})
    got = prompts.attend(q, k, v, scale=DIM ** -0.5, **options)
    torch.testing.assert_close(got, alone(q, k, v, segments, scale=DIM ** -0.5, **options))


@pytest.mark.parametrize("targets", [[4], [7, 2, 9]])
def test_a_prefix_copied_into_several_slots_at_once(targets):
    k, v = caches()
    before = k.clone()
    copy_slot_prefix([k, v], 1, targets, 6)
    for t in targets:
        assert torch.equal(k[t, :, :6], k[1, :, :6]) and torch.equal(v[t, :, :6], v[1, :, :6])
        assert torch.equal(k[t, :, 6:], before[t, :, 6:])  # past the prefix: untouched
    others = [s for s in range(SLOTS) if s not in targets]
    assert torch.equal(k[others], before[others])
