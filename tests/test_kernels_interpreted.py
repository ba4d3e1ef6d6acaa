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
    """Each row reads only its splits, and the last of them to finish merges them (a ticket per
    row and KV head)."""
    gen = torch.Generator().manual_seed(1)
    H, KV, D, S, C = 8, 2, 64, 3, 512
    kc = torch.randn(S, KV, C, D, generator=gen).to(torch.bfloat16)
    vc = torch.randn(S, KV, C, D, generator=gen).to(torch.bfloat16)
    q = torch.randn(4, H, D, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([1, 2, 0, 1], dtype=torch.int32)
    lens = torch.tensor([500, 7, 129, 1], dtype=torch.int32)
    attention = K.DecodeAttention(4, H, KV, D, C, torch.device("cpu"), torch.bfloat16, split_len=64)
    attention.part_out.fill_(float("nan"))  # what an empty split would leave: the merge must not read it
    o = attention(q, kc, vc, slots, lens, D ** -0.5).clone()
    # the last split of each row and KV head merged and gave its ticket back: a second launch
    # (the next layer, the next step's graph replay) merges again, once
    assert not attention.tickets.any()
    attention.out.zero_()
    assert torch.equal(attention(q, kc, vc, slots, lens, D ** -0.5), o)
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
    act = K.gated_act(gate_up, torch.bfloat16)
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


@pytest.mark.parametrize("D,R,gemma", [(24, 24, False), (32, 24, True), (64, 64, False)])
def test_rope_kv_with_qk_norms_and_partial_rotary(D, R, gemma):
    """Qwen3 / Gemma 3 q/k norms (each norm style) before RoPE on the first R dims (Phi-4-mini's
    partial rotary), any head size (Phi-3's 96 is not a power of two): against the reference
    path's own functions."""
    from daemon.engine.forward import apply_rope, gemma_norm, rms_norm, signed_sin

    gen = torch.Generator().manual_seed(5)
    H, KV, S, C = 4, 2, 2, 16
    positions = torch.tensor([3, 9], dtype=torch.int32)
    slots = torch.tensor([1, 0], dtype=torch.int32)
    qkv = torch.randn(2, (H + 2 * KV) * D, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, R, 2).float() / R)
    angles = torch.arange(C).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    q_norm, k_norm = torch.rand(D, generator=gen) + 0.5, torch.rand(D, generator=gen) + 0.5
    k_cache = torch.zeros(S, KV, C, D)
    v_cache = torch.zeros_like(k_cache)
    q = K.rope_kv(qkv, cos, sin, positions, slots, k_cache, v_cache, H, KV, D, q_norm=q_norm, k_norm=k_norm,
                  eps=1e-6, gemma=gemma)
    norm = gemma_norm if gemma else rms_norm
    heads = qkv.view(2, H + 2 * KV, D)
    for t in range(2):
        pos, slot = int(positions[t]), int(slots[t])
        expect_q = apply_rope(norm(heads[t, :H], q_norm, 1e-6), cos[pos], signed_sin(sin[pos]))
        expect_k = apply_rope(norm(heads[t, H:H + KV], k_norm, 1e-6), cos[pos], signed_sin(sin[pos]))
        assert rel(q[t], expect_q) < 1e-5 and rel(k_cache[slot, :, pos], expect_k) < 1e-5
        assert torch.equal(v_cache[slot, :, pos], heads[t, H + KV:])


@pytest.mark.parametrize("D,window,softcap,sinks", [(24, None, None, False), (64, 5, None, False),
                                                    (32, None, 20.0, False), (32, 70, 50.0, False),
                                                    (64, None, None, True), (64, 9, None, True)])
def test_decode_attention_with_windows_softcaps_and_sinks(D, window, softcap, sinks):
    """Each row over its own slot and length, against the reference path's attention; gpt-oss's
    sinks (a logit per head in the softmax's sum) in the merge of the splits."""
    from daemon.engine.attention import attend

    gen = torch.Generator().manual_seed(6)
    H, KV, S, C = 4, 2, 2, 256
    kc, vc = torch.randn(S, KV, C, D, generator=gen), torch.randn(S, KV, C, D, generator=gen)
    q = torch.randn(3, H, D, generator=gen) * 3
    slots = torch.tensor([1, 0, 1], dtype=torch.int32)
    lens = torch.tensor([200, 3, 71], dtype=torch.int32)
    attention = K.DecodeAttention(3, H, KV, D, C, torch.device("cpu"), torch.float32, split_len=64)
    attention.part_out.fill_(float("nan"))  # what a skipped split leaves: never read
    sink = torch.randn(H, generator=gen) * 3 if sinks else None
    o = attention(q, kc, vc, slots, lens, D ** -0.5, window, softcap, sink)
    for b in range(3):
        n, s = int(lens[b]), int(slots[b])
        ref = attend(q[b:b + 1, :, None], kc[s:s + 1, :, :n], vc[s:s + 1, :, :n], torch.tensor([[n - 1]]),
                     scale=D ** -0.5, window=window, softcap=softcap, sinks=sink)
        assert rel(o[b], ref[0, :, 0]) < 1e-5


def test_gpt_oss_norm_scales_before_rounding():
    """gpt-oss's RMSNorm multiplies by w in fp32 and rounds once: the kernel gives the reference
    path's result where Llama's (rounded, then scaled) differs."""
    from daemon.engine.forward import fp32_scaled_norm, rms_norm

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 256, generator=gen).to(torch.bfloat16)
    w = (torch.rand(256, generator=gen) * 2 + 0.3).to(torch.bfloat16)
    normed, _ = K.add_rmsnorm(x, w, 1e-5, fp32_scale=True)
    expected, llama = fp32_scaled_norm(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert (normed == expected).float().mean() > 0.99 > (llama == expected).float().mean()


def test_gemma_norms_sandwich_and_gelu():
    """Gemma's (1 + w) norm in fp32, the sandwich (the sublayer output normed before the
    residual add), and GELU-tanh * up: against the reference path's functions."""
    from daemon.engine.forward import ACTIVATION_FUNCTIONS, gemma_norm

    gen = torch.Generator().manual_seed(7)
    out = torch.randn(3, 96, generator=gen)  # a sublayer's fp32 output
    residual = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    w, pre = (torch.randn(96, generator=gen) * 0.2).to(torch.bfloat16), (torch.randn(96, generator=gen) * 0.2).to(torch.bfloat16)
    normed, summed = K.add_rmsnorm(out, w, 1e-6, residual=residual, gemma=True, pre_weight=pre)
    s = residual + gemma_norm(out.to(torch.bfloat16), pre, 1e-6)
    assert rel(summed, s) < 1e-2 and rel(normed, gemma_norm(s, w, 1e-6)) < 1e-2
    gate_up = torch.randn(2, 2 * 300, generator=gen)
    act = K.gated_act(gate_up, torch.float32, gelu=True)
    assert rel(act, ACTIVATION_FUNCTIONS["gelu_tanh"](gate_up[:, :300]) * gate_up[:, 300:]) < 1e-5


def test_copy_prefix_into_several_slots():
    from daemon.engine.attention import copy_slot_prefix

    gen = torch.Generator().manual_seed(2)
    caches = [torch.randn(5, 2, 40, 8, generator=gen).to(torch.bfloat16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    K.copy_prefix(caches, 3, [0, 4, 1], 17)
    copy_slot_prefix(expected, 3, [0, 4, 1], 17)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    assert not torch.equal(caches[0][2], caches[0][3])  # a slot not named is left alone


# (experts, top k, softmax after top k, renormalized, weights in fp32): Mixtral, Qwen3-MoE,
# Qwen2-MoE (unnormalized), gpt-oss, and a count that is not a power of two (Qwen1.5-MoE's 60)
ROUTINGS = [(8, 2, False, True, True), (128, 8, False, True, False), (60, 4, False, False, False),
            (32, 4, True, False, False)]


@pytest.mark.parametrize("experts,top_k,after,normalize,fp32", ROUTINGS)
def test_route_topk_is_the_reference_routing(experts, top_k, after, normalize, fp32):
    """The fused routing against engine/forward.route on the same logits: the same experts in
    the same order, weights to the dtype's rounding; ties go to the lower expert."""
    from daemon.engine.forward import route
    from daemon.engine.spec import Experts

    gen = torch.Generator().manual_seed(experts)
    # distinct logits (bf16 rounds random ones into ties, which torch.topk orders as it likes),
    # exactly so through an identity router: steps of 1/8 are exact in bf16 up to 32
    h = torch.stack([torch.randperm(experts, generator=gen) / 8 - experts / 16 for _ in range(5)]).to(torch.bfloat16)
    router = torch.eye(experts, dtype=torch.bfloat16)
    h[4] = 0  # every logit equal: the lowest experts, in order
    moe = Experts(count=experts, top_k=top_k, normalize=normalize, route_in_fp32=fp32, shared=False,
                  softmax_after_topk=after, interleaved=False, sparse=(True,))
    expected_weights, expected_chosen = route(h, router, moe)
    logits = torch.nn.functional.linear(h, router)
    dtype = logits.dtype if after or not fp32 else torch.float32
    weights, chosen = K.route_topk(logits, top_k, after, normalize, dtype)
    assert chosen.dtype == torch.int32 and weights.dtype == expected_weights.dtype
    assert chosen[:4].tolist() == expected_chosen[:4].tolist()
    assert chosen[4].tolist() == list(range(top_k))
    tolerance = 1e-6 if fp32 else 1e-2
    assert torch.allclose(weights.float(), expected_weights.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows,top_k,d,dtype", [(1, 8, 2048, torch.bfloat16), (3, 4, 2880, torch.float32),
                                                (2, 2, 4096 + 64, torch.bfloat16)])
def test_weighted_sum_is_the_routing_weighted_sum(rows, top_k, d, dtype):
    """The MoE combine: each token's pairs' outputs times their weights, summed in fp32 (D past
    one block, and not a power of two: gpt-oss's 2,880)."""
    gen = torch.Generator().manual_seed(rows * top_k)
    y = torch.randn(rows * top_k, d, generator=gen)
    weights = torch.rand(rows, top_k, generator=gen).to(dtype)
    out = K.weighted_sum(y, weights)
    expected = (y.view(rows, top_k, d) * weights.float()[..., None]).sum(dim=1)
    assert out.dtype == torch.float32 and out.shape == (rows, d)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # the next layer's norm summing the pairs as it reads them: what the sum then the norm give
    residual = torch.randn(rows, d, generator=gen).to(torch.bfloat16)
    norm = (torch.rand(d, generator=gen) + 0.5).to(torch.bfloat16)
    pre = (torch.rand(d, generator=gen) + 0.5).to(torch.bfloat16)  # a sandwich norm on the MLP's output
    fused = K.add_rmsnorm(y, norm, 1e-6, residual=residual, pre_weight=pre, combine=weights)
    apart = K.add_rmsnorm(out, norm, 1e-6, residual=residual, pre_weight=pre)
    assert all(torch.equal(a, b) for a, b in zip(fused, apart))


@pytest.mark.parametrize("experts,top_k,after,normalize,fp32", ROUTINGS)
def test_the_fused_router_is_the_reference_routing(experts, top_k, after, normalize, fp32):
    """The router's product and top k in one launch (kernels.Router) against engine/forward.route
    on the same rows, with a bias (gpt-oss's): the same experts, the same weights; twice, as a
    captured graph replays it (each row's ticket back at zero after a launch)."""
    from daemon.engine.forward import route
    from daemon.engine.spec import Experts

    gen = torch.Generator().manual_seed(experts + 1)
    h = torch.stack([torch.randperm(experts, generator=gen) / 4 - experts / 8 for _ in range(3)])
    h = torch.cat([h, torch.zeros(1, experts)]).to(torch.bfloat16)  # the last row: every logit equal
    router = torch.eye(experts, dtype=torch.bfloat16) / 2  # exact: the logits are h / 2 + bias
    bias = (torch.arange(experts) % 3 / 64).to(torch.bfloat16) if after else None
    moe = Experts(count=experts, top_k=top_k, normalize=normalize, route_in_fp32=fp32, shared=False,
                  softmax_after_topk=after, interleaved=False, sparse=(True,))
    expected_weights, expected_chosen = route(h, router, moe, bias)
    dtype = h.dtype if after or not fp32 else torch.float32
    fused = K.Router(router, bias, max_rows=8)
    for _ in range(2):
        weights, chosen = fused(h, top_k, after, normalize, dtype)
        assert chosen[:3].tolist() == expected_chosen[:3].tolist()
        tied = [0.0] * experts if bias is None else bias.float().tolist()  # ties to the lower expert
        assert chosen[3].tolist() == sorted(range(experts), key=lambda e: (-tied[e], e))[:top_k]
        tolerance = 1e-6 if fp32 else 1e-2
        assert torch.allclose(weights.float(), expected_weights.float(), atol=tolerance, rtol=tolerance)
        assert fused.tickets.eq(0).all()
