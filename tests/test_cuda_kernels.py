"""The decode step's other kernels (kernels.py: RMSNorm, RoPE, attention) against PyTorch
references (GPU only; CI runs them in the interpreter: test_kernels_interpreted)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

K = pytest.importorskip("daemon.engine.cuda.kernels") if torch.cuda.is_available() else None


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fused_norm_rope_attention():
    torch.manual_seed(1)
    x, r = torch.randn(5, 4096, dtype=torch.bfloat16, device="cuda"), torch.randn(5, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.rand(4096, dtype=torch.bfloat16, device="cuda")
    out, res = K.add_rmsnorm(x, w, 1e-5, residual=r)
    s = x + r
    ref = w * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(res, s) and rel(out, ref) < 1e-2
    H, KV, D, S, C = 32, 8, 128, 3, 1024
    kc = torch.randn(S, KV, C, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.randn(4, H, D, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([1, 2, 0, 1], dtype=torch.int32, device="cuda")
    lens = torch.tensor([1000, 7, 257, 1], dtype=torch.int32, device="cuda")
    o = K.DecodeAttention(4, H, KV, D, C, torch.device("cuda"), torch.bfloat16)(q, kc, vc, slots, lens, D ** -0.5)
    for b in range(4):
        n, s_ = int(lens[b]), int(slots[b])
        ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :, None], kc[s_:s_ + 1, :, :n],
                                                               vc[s_:s_ + 1, :, :n], enable_gqa=True)[0, :, 0]
        assert rel(o[b], ref) < 1e-2


def test_copy_prefix_into_many_slots_as_pytorch_does():
    from daemon.engine.attention import copy_slot_prefix

    torch.manual_seed(3)
    caches = [torch.randn(33, 8, 4096, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    expected = [c.clone() for c in caches]
    targets = list(range(1, 32))
    K.copy_prefix(caches, 0, targets, 2010)
    copy_slot_prefix(expected, 0, targets, 2010)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))


@pytest.mark.parametrize("experts,top_k,hidden,biased", [(128, 8, 2048, False), (32, 4, 2880, True)])
def test_the_fused_router_routes_as_cublas_logits_do(experts, top_k, hidden, biased):
    """The router's product and top k in one launch (the last program of each row taking the top
    k: its atomics and fences as compiled for the card) against route_topk over F.linear's
    logits, at decode batches, replayed in a CUDA graph: the same experts wherever the top k is
    not a near tie, the same weights."""
    torch.manual_seed(experts)
    router = torch.randn(experts, hidden, dtype=torch.bfloat16, device="cuda") * 0.05
    bias = torch.randn(experts, dtype=torch.bfloat16, device="cuda") if biased else None
    fused = K.Router(router, bias, max_rows=64)
    compared = []
    for rows in (1, 8, 64):
        h = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
        logits = torch.nn.functional.linear(h, router, bias)
        want_w, want_e = K.route_topk(logits, top_k, biased, True, torch.float32)
        graph = torch.cuda.CUDAGraph()
        fused(h, top_k, biased, True, torch.float32)  # compiled outside the capture
        with torch.cuda.graph(graph):
            weights, chosen = fused(h, top_k, biased, True, torch.float32)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            sorted_logits = logits.float().sort(dim=-1, descending=True).values
            clear = (sorted_logits[:, top_k - 1] - sorted_logits[:, top_k]) > 0.05  # no near tie at the cut
            # as sets: a near tie inside the top k may order its two either way
            got_e, got_at = chosen[clear].sort(dim=-1)
            ref_e, ref_at = want_e[clear].sort(dim=-1)
            assert torch.equal(got_e, ref_e)
            compared.append(clear.float().mean().item())
            assert torch.allclose(weights[clear].gather(1, got_at), want_w[clear].gather(1, ref_at), atol=2e-2)
            assert fused.tickets.eq(0).all()
    assert sum(compared) / len(compared) > 0.5  # most rows had no near tie to skip
