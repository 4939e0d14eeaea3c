"""Capture stage: statistics equal a brute-force computation over materialized activations."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gprune.maths.capture import (ActivationCapture, NonFiniteActivationError,
                                  capture_statistics)
from gprune.maths.moments import ChannelMoments, Workspace
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import nan_model, no_hooks

TAU = 0.5


@pytest.fixture(params=["compiled", "torch"])
def capture_path(request, monkeypatch) -> str:
    """Run a test through the compiled CPU kernels and through the pure-torch statistics."""
    from gprune.maths.native import NATIVE_ENV, capture_kernels, compiler_command

    if request.param == "torch":
        monkeypatch.setenv(NATIVE_ENV, "0")
        assert capture_kernels() is None
    else:
        monkeypatch.delenv(NATIVE_ENV, raising=False)
        if shutil.which(compiler_command()) is None:
            pytest.skip("no C compiler: the compiled kernels cannot be built here")
        assert capture_kernels() is not None   # a compiler is here: the kernels must build
    return request.param


def _tokens(n=5, length=24, seed=1):
    """Random ids: rows 0-1 full, 2-3 right-padded (a pair with padded tail columns), 4 empty."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[2, 10:] = 0
    mask[3, 5:] = 0
    mask[4, :] = 0
    ids[mask == 0] = 258
    return ids, mask


class _Recorder:
    """Brute force: keep every hooked activation of every batch (test-only)."""

    def __init__(self, model, adapter):
        self.layers = adapter.decoder_layers(model)
        self.data = {k: [[] for _ in self.layers] for k in ("attn", "mlp", "in", "out")}
        self.handles = []
        for i, layer in enumerate(self.layers):
            self._pre(adapter.attn_output(layer), "attn", i)
            self._pre(adapter.mlp_output(layer), "mlp", i)
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: self.data["in"][i].append(
                    (a[0] if a else kw["hidden_states"]).double().clone()), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, a, out, i=i: self.data["out"][i].append(
                    (out[0] if isinstance(out, tuple) else out).double().clone())))

    def _pre(self, module, kind, i):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, a: self.data[kind][i].append(a[0].double().clone())))

    def rows(self, kind, layer, mask, batch_size):
        """(n, C) float64 activations of the non-padding tokens, all batches."""
        kept, batches = [], [mask[s:s + batch_size] for s in range(0, len(mask), batch_size)]
        batches = [b for b in batches if b.any()]
        for act, batch_mask in zip(self.data[kind][layer], batches):
            width = act.shape[1]   # capture may drop trailing all-padding columns
            assert not batch_mask[:, width:].any()
            kept.append(act[batch_mask[:, :width].bool()])
        return torch.cat(kept).numpy()

    def remove(self):
        for h in self.handles:
            h.remove()


def _brute_force_channels(x):
    rms = np.sqrt((x ** 2).mean(axis=1, keepdims=True))
    return dict(count=np.full(x.shape[1], x.shape[0]), sum=x.sum(0), sumsq=(x ** 2).sum(0),
                sum_abs=np.abs(x).sum(0), active=(np.abs(x) > TAU * rms).sum(0))


def test_statistics_equal_brute_force(family, capture_path):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    ids, mask = _tokens()
    recorder = _Recorder(model, adapter)
    try:
        result = capture_statistics(model, adapter, ids, mask, batch_size=2, tau_act=TAU,
                                    progress=False)
    finally:
        recorder.remove()
    assert result.tokens == int(mask.sum()) == 5 + 10 + 24 + 24
    assert result.statistics_path == capture_path
    shape = adapter.shape(model.config)
    for layer in range(shape.num_layers):
        for kind, width in (("mlp", shape.intermediate), ("attn", shape.heads * shape.head_dim)):
            got = result.channels.query("layer == @layer and kind == @kind").sort_values("channel")
            assert len(got) == width  # attn: one channel per query-head dimension, also under GQA
            want = _brute_force_channels(recorder.rows(kind, layer, mask, 2))
            for column in ("count", "active"):
                np.testing.assert_array_equal(got[column].to_numpy(), want[column])
            for column in ("sum", "sumsq", "sum_abs"):
                np.testing.assert_allclose(got[column].to_numpy(), want[column],
                                           rtol=1e-6, atol=1e-12)
        h_in = recorder.rows("in", layer, mask, 2)
        h_out = recorder.rows("out", layer, mask, 2)
        norms = np.linalg.norm(h_in, axis=1) * np.linalg.norm(h_out, axis=1)
        cosine = (h_in * h_out).sum(1) / norms
        row = result.layers.iloc[layer]
        assert row.cosine_count == result.tokens
        np.testing.assert_allclose(row.cosine_sum, cosine.sum(), rtol=1e-6)


def test_padding_never_enters_and_batching_does_not_matter(capture_path):
    model = tiny_model("qwen2")   # attention with biases
    adapter = adapter_for(model.config)
    ids, mask = _tokens()
    base = capture_statistics(model, adapter, ids, mask, batch_size=5, progress=False)
    other_pad = ids.clone()
    other_pad[mask == 0] = 7       # different content where the mask is 0
    repadded = capture_statistics(model, adapter, other_pad, mask, batch_size=5, progress=False)
    rebatched = capture_statistics(model, adapter, ids, mask, batch_size=1, progress=False)
    # rebatching changes float32 matmul shapes: compare at float32 precision
    for other, rtol, atol in ((repadded, 1e-9, 1e-9), (rebatched, 1e-5, 1e-5)):
        for column in ("sum", "sumsq", "sum_abs"):
            np.testing.assert_allclose(other.channels[column], base.channels[column], rtol=rtol,
                                       atol=atol)
        np.testing.assert_allclose(other.layers.cosine_sum, base.layers.cosine_sum, rtol=rtol)
    assert (repadded.channels.active == base.channels.active).all()


def test_channel_moments_alone_with_chunks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=gen) * torch.tensor([1.0, 2.0, 0.1, 5.0, 1.0]) + 3.0
    acc = ChannelMoments(5, tau_act=TAU, device="cpu", chunk_elements=5 * 4)  # 10 chunks
    workspace = Workspace("cpu")
    acc.update(x[:20], workspace)
    acc.update(x[20:], workspace)
    want = _brute_force_channels(x.double().numpy())
    assert acc.count == 37 and acc.chunk_rows == 4
    np.testing.assert_array_equal(acc.active_counts().numpy(), want["active"])
    np.testing.assert_allclose(acc.sumsq.numpy(), want["sumsq"], rtol=1e-12)
    np.testing.assert_allclose(acc.sum_abs.numpy(), want["sum_abs"], rtol=1e-12)
    np.testing.assert_allclose(acc.sum.numpy(), want["sum"], rtol=1e-12)  # float64 exact
    np.testing.assert_allclose(acc.mean().numpy(), x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(acc.var().numpy(), x.double().var(0, unbiased=False).numpy(),
                               rtol=1e-9)


def test_nan_is_an_error_naming_layer_and_source_and_hooks_are_removed(capture_path):
    model, adapter = nan_model()
    ids, mask = _tokens()
    with pytest.raises(NonFiniteActivationError, match=r"MLP .* of layer 1 of source 'wiki'"):
        capture_statistics(model, adapter, ids, mask, batch_size=2, label="wiki", progress=False)
    assert no_hooks(model)


def test_hooks_removed_on_success_and_error():
    model = tiny_model("starcoder2")
    adapter = adapter_for(model.config)
    ids, mask = _tokens()
    with ActivationCapture(model, adapter) as capture:
        assert not no_hooks(model)
        assert capture.forward(ids[2:4], mask[2:4]) == 10 + 5
        assert capture.forward(ids[4:], mask[4:]) == 0   # all padding: nothing runs
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCapture(model, adapter):
            raise RuntimeError("boom")
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="inside `with`"):
        ActivationCapture(model, adapter).forward(ids, mask)


def test_configs_validate_at_construction():
    from gprune.configs.capture import CaptureConfig
    from gprune.configs.stats import StatsConfig
    from gprune.errors import ConfigError

    config = CaptureConfig(source="wiki")
    defaults = (config.n_sequences, config.seq_len, config.batch_size, config.tau_act)
    assert defaults == (32, 512, 4, 0.5)
    assert "device" not in config.params() and config.requested_tokens == 32 * 512
    for bad in (dict(source=""), dict(source="w", n_sequences=0), dict(source="w", seq_len=-1),
                dict(source="w", batch_size=0), dict(source="w", tau_act=0.0),
                dict(source="w", device="gpu"), dict(source="w", extra=1)):
        with pytest.raises(ConfigError):
            CaptureConfig.build(**bad)
    assert StatsConfig().metrics == ("wanda_sp", "flap")
    for bad in (dict(metrics=()), dict(metrics=("wanda_sp", "wanda_sp")), dict(metrics=("x",))):
        with pytest.raises(ConfigError):
            StatsConfig.build(**bad)


def test_serial_hooks_change_only_the_calling_threads_thread_count():
    import threading

    from gprune.maths.capture import serial_on_this_thread

    before = torch.get_num_threads()
    seen = {}
    worker = threading.Thread(target=lambda: seen.update(other=torch.get_num_threads()))
    with serial_on_this_thread(torch.device("cpu")):
        seen["inside"] = torch.get_num_threads()
        worker.start()
        worker.join()
    assert seen["other"] == before          # threads started meanwhile keep the default
    assert torch.get_num_threads() == before
    if before > 1 and "OpenMP" in torch.__config__.parallel_info():
        assert seen["inside"] == 1
