"""Compiled capture kernels: equal to the pure-torch reference; clean fallback without them."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from gprune.maths import native
from gprune.maths.moments import ChannelMoments, Workspace


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    if shutil.which(native.compiler_command()) is None:
        pytest.skip("no C compiler: the compiled kernels cannot be built here")
    built = native.capture_kernels()
    assert built is not None
    return built


def _activations(rows=203, channels=37, seed=0):
    """Channels of very different scales and means (some near zero-mean, some far from it)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 3, channels)
    shift = torch.randn(channels, generator=gen) * scale * torch.rand(channels, generator=gen)
    return torch.randn(rows, channels, generator=gen) * scale + shift           # (n, C)


@pytest.mark.parametrize("selected", [None, "every third row"])
def test_channel_moments_equal_the_torch_path(kernels, selected):
    x = _activations()
    rows = None if selected is None else torch.arange(1, x.shape[0], 3)
    fused = ChannelMoments(x.shape[1], tau_act=0.5, device="cpu")
    fused.update_fused(kernels, x, rows)
    fused.update_fused(kernels, x[:50], None)           # accumulates over calls
    reference = ChannelMoments(x.shape[1], tau_act=0.5, device="cpu", chunk_elements=64)
    reference.update(x if rows is None else x[rows], Workspace("cpu"))
    reference.update(x[:50], Workspace("cpu"))
    assert fused.count == reference.count == (x.shape[0] if rows is None else len(rows)) + 50
    np.testing.assert_allclose(fused.totals[:3].numpy(), reference.totals[:3].numpy(),
                               rtol=1e-12)
    assert torch.equal(fused.active_counts(), reference.active_counts())
    assert 0 < int(fused.active_counts().sum()) < fused.count * x.shape[1]


def test_strided_rows_and_non_finite_values(kernels):
    wide = _activations(rows=20, channels=24)
    x = wide[:, :16]                                     # row stride 24, channels contiguous
    acc = ChannelMoments(16, tau_act=0.5, device="cpu")
    acc.update_fused(kernels, x, None)
    np.testing.assert_allclose(acc.sum.numpy(), x.double().sum(0).numpy(), rtol=1e-12)
    assert bool(acc.finite())
    x = x.clone()
    x[7, 3] = float("inf")
    acc.update_fused(kernels, x, None)
    assert not bool(acc.finite())


def test_cosine_sum_equals_float64_cosines(kernels):
    a, b = _activations(seed=1), _activations(seed=2)
    b[5] = 0.0                                           # a zero vector's cosine counts as 0
    rows = torch.tensor([0, 5, 9, 100, 202])
    want = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    want[5] = 0.0
    assert kernels.cosine_sum(a, b, None) == pytest.approx(want.sum().item(), rel=1e-12)
    assert kernels.cosine_sum(a, b, rows) == pytest.approx(want[rows].sum().item(), rel=1e-12)
    a[9, 0] = float("nan")
    assert np.isnan(kernels.cosine_sum(a, b, rows))


def test_only_float32_cpu_matrices_with_contiguous_channels_are_accepted(kernels):
    x = torch.zeros(4, 6)
    assert kernels.accepts(x, x[:, :3])
    for other in (x.double(), x.bfloat16(), x.t(), x[None]):
        assert not kernels.accepts(other)
    with pytest.raises(ValueError, match="float64"):
        kernels.channel_moments(x, None, 0.5, torch.zeros(4, 6))
    with pytest.raises(ValueError, match="out of range"):
        kernels.cosine_sum(x, x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="int64"):
        kernels.channel_moments(x, torch.tensor([0, 1], dtype=torch.int32), 0.5,
                                torch.zeros(4, 6, dtype=torch.float64))


def test_built_once_into_the_cache_and_reused(kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("GPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    first = native.capture_kernels()
    built = list((tmp_path / "native").glob("capture_kernels-*.so"))
    assert first is not None and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_LOADED", {})           # a new process: loads, no rebuild
    assert native.capture_kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "native").iterdir() if p != built[0]]   # no scratch left


def test_without_a_compiler_capture_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    monkeypatch.setenv("GPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="gprune"):
        assert native.capture_kernels() is None
        assert native.capture_kernels() is None
    warnings = [r for r in caplog.records if "compiled kernels unavailable" in r.message]
    assert len(warnings) == 1 and "no C compiler" in warnings[0].message


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.capture_kernels() is None
