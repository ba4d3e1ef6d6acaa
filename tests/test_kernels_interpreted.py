"""The decode step's other kernels (kernels.py) on the CPU, in Triton's interpreter
(tests/triton_cpu.py), against PyTorch references. A GPU runs the real thing: test_cuda_kernels."""

import pytest
import torch
from triton_cpu import interpreted  # skips this module where the interpreter cannot run the kernels

from daemon.engine.cuda import gemv as G
from daemon.engine.cuda import kernels as K


@pytest.fixture(autouse=True)
def emulated_ptx(monkeypatch):
    interpreted(monkeypatch, G)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# (BLOCK_N, BLOCK_K, warps, split-K, x as vectors, packed bf16, prefetch)
def test_decode_attention_skips_splits_past_each_length():
    gen = torch.Generator().manual_seed(1)
    H, KV, D, S, C = 8, 2, 64, 3, 512
    kc = torch.randn(S, KV, C, D, generator=gen).to(torch.bfloat16)
    vc = torch.randn(S, KV, C, D, generator=gen).to(torch.bfloat16)
    q = torch.randn(4, H, D, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([1, 2, 0, 1], dtype=torch.int32)
    lens = torch.tensor([500, 7, 129, 1], dtype=torch.int32)
    attention = K.DecodeAttention(4, H, KV, D, C, torch.device("cpu"), torch.bfloat16, split_len=64)
    attention.part_out.fill_(float("nan"))  # what an empty split would leave: the merge must not read it
    o = attention(q, kc, vc, slots, lens, D ** -0.5)
    for b in range(4):
        n, s = int(lens[b]), int(slots[b])
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :, None].float(), kc[s:s + 1, :, :n].float(), vc[s:s + 1, :, :n].float(), enable_gqa=True)
        assert rel(o[b], ref[0, :, 0]) < 1e-2


def test_add_rmsnorm_and_silu_mul():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 256, generator=gen)  # an fp32 product, as the GEMV leaves it
    residual = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    weight = torch.rand(256, generator=gen).to(torch.bfloat16)
    normed, summed = K.add_rmsnorm(x, weight, 1e-5, residual=residual)
    s = (x + residual.float()).to(torch.bfloat16)
    ref = weight * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(summed, s) and rel(normed, ref) < 1e-2
    gate_up = torch.randn(2, 2 * 300, generator=gen)
    act = K.silu_mul(gate_up, torch.bfloat16)
    assert rel(act, torch.nn.functional.silu(gate_up[:, :300]) * gate_up[:, 300:]) < 1e-2


def test_rope_kv_rotates_q_and_k_and_writes_the_caches():
    gen = torch.Generator().manual_seed(4)
    H, KV, D, S, C = 4, 2, 64, 3, 32
    positions = torch.tensor([5, 0, 31], dtype=torch.int32)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    qkv = torch.randn(3, (H + 2 * KV) * D, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(C).float()[:, None] * inv_freq[None]
    cos = torch.cat([angles.cos()] * 2, dim=1).to(torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, dim=1).to(torch.bfloat16)
    k_cache = torch.zeros(S, KV, C, D, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    q = K.rope_kv(qkv, cos, sin, positions, slots, k_cache, v_cache, H, KV, D)

    def rotated(x, pos):  # HF's rotate_half form
        half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
        return x * cos[pos].float() + half * sin[pos].float()

    heads = qkv.view(3, H + 2 * KV, D)
    for t in range(3):
        pos, slot = int(positions[t]), int(slots[t])
        assert rel(q[t], rotated(heads[t, :H], pos)) < 1e-2
        assert rel(k_cache[slot, :, pos], rotated(heads[t, H:H + KV], pos)) < 1e-2
        assert torch.equal(v_cache[slot, :, pos], heads[t, H + KV:].to(torch.bfloat16))
    written = torch.zeros(S, C, dtype=torch.bool)
    written[slots.long(), positions.long()] = True
    assert not k_cache.permute(0, 2, 1, 3)[~written].any()  # nothing else in the caches
