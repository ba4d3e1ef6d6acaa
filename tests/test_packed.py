"""engine/packed.py: the CPU's int4 / int8 weight-only products against the float matrices
they hold, fused and separate, on both kernels: the C block kernels (engine/cpu_kernels.py)
and PyTorch's, which serve where those cannot be built."""

from __future__ import annotations

import pytest
import torch

from daemon.engine import cpu_kernels
from daemon.engine.packed import GROUP, Int4Product, Int4Weights, Int8Product, PackedLinear, fuse, int4_packable
from daemon.engine.packed import q8_0_blocks, quantize_int4


@pytest.fixture(autouse=True, params=["blocks", "torch"])
def kernel(request, monkeypatch):
    """Every test on each kernel: "blocks" where this machine builds the C kernels."""
    if request.param == "blocks":
        if cpu_kernels.load() is None:
            pytest.skip("the C block kernels do not run on this machine")
    else:
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    return request.param


def _int4(n: int, k: int, seed: int) -> Int4Weights:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    return Int4Weights(codes, torch.rand(n, k // GROUP, generator=gen) * 0.05,
                       torch.randn(n, k // GROUP, generator=gen) * 0.05)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 activations and scales (PyTorch's kernels): about 3 significant digits."""
    assert got.shape == want.shape
    assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("n,k", [(32, 64), (192, 576), (64, 1536)])
def test_int4_product_is_the_dequantized_matrix(rows, n, k):
    weights = _int4(n, k, seed=n + k)
    x = torch.randn(rows, k)
    _close(Int4Product(weights)(x), x @ weights.dequantize().t())


def test_int4_holds_a_q4_1_block_exactly():
    """w = d * q + m is (q - 8) * d + (m + 8 d): the kernel's formula."""
    d, m = torch.full((16, 1), 0.5), torch.full((16, 1), -1.25)
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).repeat(16, 1)
    weights = Int4Weights(codes, d, m + 8 * d)
    assert torch.equal(weights.dequantize(), d * codes.float() + m)
    x = torch.zeros(1, 32)
    x[0, 5] = 1.0  # picks column 5: code 5 -> 0.5 * 5 - 1.25
    assert torch.allclose(Int4Product(weights)(x).float(), torch.full((1, 16), 1.25))


@pytest.mark.parametrize("sizes", [(64, 32, 32), (576, 192, 192), (128, 48)])
@pytest.mark.parametrize("packed_first", [False, True])
def test_fused_int4_equals_the_parts_side_by_side(sizes, packed_first, kernel):
    """Unpacked parts fuse by their codes; parts already packed join on any row as blocks, and
    for PyTorch's kernel only on whole blocks of its packed rows, else they stay apart."""
    parts = [Int4Product(_int4(n, 128, seed=n)) for n in sizes]
    x = torch.randn(2, 128)
    side_by_side = torch.cat([p(x) for p in parts], dim=-1) if packed_first else None
    fused = fuse(parts)
    if packed_first and kernel == "torch" and any(n % 64 for n in sizes[:-1]):
        assert fused is None
        return
    assert fused.out_features == sum(sizes)
    assert torch.equal(fused(x), side_by_side if packed_first else torch.cat([p(x) for p in parts], dim=-1))


def test_int8_product_and_fusing():
    gen = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(48, 96, generator=gen), torch.randn(16, 96, generator=gen)
    a, b = Int8Product(w1), Int8Product(w2, bias=torch.ones(16))
    assert (a.dequantize() - w1).abs().max() <= w1.abs().amax(1).max() / 254 + 1e-6  # half a step
    x = torch.randn(3, 96)
    _close(a(x), x @ a.dequantize().t())
    fused = fuse([a, b])
    assert torch.equal(fused(x), torch.cat([a(x), b(x)], dim=-1))
    assert torch.equal(fused.bias[:48], torch.zeros(48)) and torch.equal(fused.bias[48:], torch.ones(16))


def test_kinds_that_differ_do_not_fuse():
    assert fuse([Int4Product(_int4(16, 32, 0)), Int8Product(torch.randn(16, 32))]) is None


def test_quantize_int4_round_trip_within_half_a_step():
    w = torch.randn(32, 64)
    q = quantize_int4(w)
    step = q.scale.repeat_interleave(GROUP, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("n,k,ok", [(16, 32, True), (192, 576, True), (8, 32, False), (16, 48, False)])
def test_int4_packable(n, k, ok):
    assert int4_packable(n, k) is ok
    if not ok:
        with pytest.raises(ValueError):
            Int4Product(Int4Weights(torch.zeros(n, k, dtype=torch.uint8), torch.ones(n, max(k // GROUP, 1)),
                                    torch.zeros(n, max(k // GROUP, 1))))


def test_packed_linear_keeps_the_callers_dtype():
    layer = PackedLinear(Int4Product(_int4(32, 64, 3)))
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 32)
    assert "int4" in repr(layer)


def test_a_row_does_not_depend_on_the_rows_beside_it():
    """The same bits for a row alone, in a decode batch and in a prompt chunk: greedy text must
    not change with what a request is batched with (or with the prefix cache)."""
    four = Int4Product(_int4(96, 576, seed=5))
    eight = Int8Product(torch.randn(80, 576, generator=torch.Generator().manual_seed(6)))
    x = torch.randn(13, 576)
    for product in (four, eight):
        alone = torch.cat([product(x[i:i + 1]) for i in range(len(x))])
        for rows in (2, 4, 5, 8, 13):
            assert torch.equal(product(x[:rows]), alone[:rows])


def test_int8_blocks_hold_a_q8_0_matrix_exactly(kernel):
    """A GGUF's Q8_0 tensor, dequantized, is quantized back to its own blocks."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(-127, 128, (16, 64), dtype=torch.int8, generator=gen)
    codes[:, 0], codes[:, 32] = 127, -127  # every block reaches its largest code, as ggml's do
    scale = (torch.rand(16, 2, generator=gen) * 0.01).to(torch.float16)
    weight = codes.float() * scale.float().repeat_interleave(GROUP, dim=1)
    blocks = q8_0_blocks(weight)
    assert torch.equal(blocks[..., 2:].contiguous().view(torch.int8).reshape(16, 64), codes)
    assert torch.equal(blocks[..., :2].contiguous().view(torch.float16)[..., 0], scale)
    if kernel == "blocks":
        assert torch.equal(Int8Product(weight).dequantize(), weight)


def test_bias_is_added_in_the_outputs_dtype():
    product = Int4Product(_int4(32, 64, 9), bias=torch.arange(32, dtype=torch.float32))
    x = torch.randn(3, 64)
    without = Int4Product(_int4(32, 64, 9))(x)
    assert torch.allclose(product(x).float(), without.float() + torch.arange(32), atol=0.1, rtol=1e-2)
