"""engine/cpu_kernels.py: the C block products against the float matrices their blocks hold,
the fused RMSNorm against PyTorch's, and the build: once per machine, atomic, and None (so that
PyTorch's kernels serve) wherever the CPU or the machine cannot have it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from daemon.engine import cpu_kernels
from daemon.engine.packed import GROUP, Int4Weights, q8_0_blocks

KERNELS = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the C kernels do not run on this machine")


def _q4_1(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, k // GROUP, generator=gen) * 0.05).half().float()
    zero = (torch.randn(n, k // GROUP, generator=gen) * 0.05).half().float() + 8 * scale
    weights = Int4Weights(codes, scale, zero)
    return weights.q4_1_blocks(), weights.dequantize()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("n,k", [(16, 32), (96, 576), (40, 1536)])
def test_block_products_are_the_matrices_they_hold(rows, n, k):
    """int16 activations per block: within about 1e-4 of the float product (bf16's 4e-3),
    outliers included."""
    x = torch.randn(rows, k)
    x[:, 7] = 60.0  # an outlier a hundred times the rest, as SmolLM2's activations have
    blocks, dense = _q4_1(n, k, seed=n + k)
    want = x.double() @ dense.double().t()
    assert (KERNELS.q4_1(blocks, x).double() - want).abs().max() <= 2e-4 * want.abs().max()
    weight = torch.randn(n, k)
    q8 = q8_0_blocks(weight)
    scale = q8[..., :2].contiguous().view(torch.float16).float()
    dense8 = (q8[..., 2:].contiguous().view(torch.int8).float() * scale).reshape(n, k)
    want8 = x.double() @ dense8.double().t()
    assert (KERNELS.q8_0(q8, x).double() - want8).abs().max() <= 2e-4 * want8.abs().max()


@needs_kernels
def test_bias_shapes_and_empty_inputs():
    blocks, dense = _q4_1(32, 64, seed=1)
    bias = torch.arange(32, dtype=torch.float32)
    x = torch.randn(2, 3, 64)
    y = KERNELS.q4_1(blocks, x, bias)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float32
    assert torch.allclose(y, x @ dense.t() + bias, atol=1e-3)
    assert KERNELS.q4_1(blocks, torch.empty(0, 64)).shape == (0, 32)
    assert torch.allclose(KERNELS.q4_1(blocks, x.double().transpose(0, 1)), (x @ dense.t()).transpose(0, 1), atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 576), (5, 64), (3, 2, 40)])
def test_rms_norm_is_pytorchs(shape):
    x = torch.randn(shape) * 3
    w = torch.randn(shape[-1])
    assert torch.allclose(KERNELS.rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5), atol=1e-6, rtol=1e-6)


@needs_kernels
def test_built_once_into_the_users_cache_without_leftovers(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    first = cpu_kernels.load.__wrapped__()
    assert first is not None
    built = list((tmp_path / ".cache" / "hfollama" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert cpu_kernels.load.__wrapped__() is not None
    assert [p.name for p in built[0].parent.iterdir()] == [built[0].name]  # no temporary file left
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernels
def test_an_unwritable_cache_builds_in_a_private_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    monkeypatch.setattr(Path, "home", lambda: home)
    try:
        if _writable(home):
            pytest.skip("running as a user whom permissions do not stop")
        assert cpu_kernels.load.__wrapped__() is not None
    finally:
        home.chmod(0o700)


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").touch()
        return True
    except PermissionError:
        return False


@pytest.mark.parametrize("case", ["no compiler", "not x86", "held below AVX2", "compile fails"])
def test_none_where_the_kernels_cannot_run(case, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    if case == "no compiler":
        monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    elif case == "not x86":
        monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "arm64")
    elif case == "held below AVX2":
        monkeypatch.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    else:
        if not cpu_kernels.cpu_supports():
            pytest.skip("this CPU never tries to build")
        bad = tmp_path / "broken.c"
        bad.write_text("this is not C\n")
        monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    with caplog.at_level(logging.INFO, logger="daemon.engine.cpu_kernels"):
        assert cpu_kernels.load.__wrapped__() is None
    if case == "compile fails":
        assert "could not be built" in caplog.text
        assert not list((tmp_path / ".cache" / "hfollama" / "kernels").glob("*"))  # nothing half-written
