"""The learned allocators layer streamed: the same objective history and the same learned
path or keep fractions as in memory, on tiny models of several families (GQA and
sliding-window layers included), and the path stage picking streaming from ``stream``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gprune.maths.learned import LearnSettings, learn_fractions
from gprune.maths.learned_path import PathSettings, learn_path
from gprune.maths.partition import partition_units
from gprune.maths.score import score_units
from gprune.models.loader import load_model, resolve_model
from gprune.models.streamed import StreamedModel
from tests.synthetic import no_hooks, random_units
from tests.test_stage_chain import chain  # noqa: F401  (a module fixture)

RTOL = 1e-5


def _inputs(family: str):
    ref = resolve_model(f"tiny:{family}")
    model, _, adapter = load_model(ref)
    shape = adapter.shape(model.config)
    units = random_units(shape, sources=2, seed=4)
    scores, _ = score_units(units, partition_units(units, 1, "wanda_sp"), "wanda_sp", "wanda_sp")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0                                       # padding at the end of a row
    return ref, model, adapter, shape, scores, [(ids[:2], mask[:2]), (ids[2:], mask[2:])]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "starcoder2"])
def test_streamed_learned_path_equals_in_memory(family):
    ref, model, adapter, shape, scores, batches = _inputs(family)
    settings = PathSettings(steps=6, lr=0.2, grid=(0.2, 0.4))
    want, want_history = learn_path(model, adapter, shape, scores, batches, settings)
    source = StreamedModel(ref.path)
    got, history = learn_path(source, source.adapter, shape, scores, batches, settings)
    np.testing.assert_allclose(history, want_history, rtol=RTOL)
    for column in ("a", "b"):
        np.testing.assert_allclose(got[column], want[column], rtol=RTOL, atol=RTOL)
    assert not ((got.a == 0).all() and (got.b == 1).all())          # the path moved
    assert no_hooks(source.model)
    assert all(p.is_meta for layer in source.layers for p in layer.parameters())


def test_streamed_per_target_learning_equals_in_memory():
    ref, model, adapter, shape, scores, batches = _inputs("qwen3")
    settings = LearnSettings(steps=4, lr=0.2)
    want, want_history = learn_fractions(model, adapter, shape, scores, batches, 0.3, settings)
    source = StreamedModel(ref.path)
    got, history = learn_fractions(source, source.adapter, shape, scores, batches, 0.3, settings)
    np.testing.assert_allclose(history, want_history, rtol=RTOL)
    np.testing.assert_allclose([got.mlp[m] for m in sorted(want.mlp)],
                               [want.mlp[m] for m in sorted(want.mlp)], rtol=RTOL)
    np.testing.assert_allclose([got.attn[l] for l in sorted(want.attn)],
                               [want.attn[l] for l in sorted(want.attn)], rtol=RTOL)


def test_learning_inputs_stream_when_asked(tmp_path, monkeypatch):
    """``learning_inputs`` gives a ``StreamedModel`` with stream=on, the model with off."""
    from gprune.configs.allocate import AllocateConfig
    from tasks import learning

    ref = resolve_model("tiny:llama")

    class Stats:
        extra = {"model_path": str(ref.path)}

    monkeypatch.setattr(learning, "calibration_batches", lambda *args: ["batches"])
    streamed, _, batches = learning.learning_inputs(
        AllocateConfig(sparsity=0.3, stream="on", device="cpu"), None, Stats())
    assert isinstance(streamed, StreamedModel) and batches == ["batches"]
    dense, _, _ = learning.learning_inputs(
        AllocateConfig(sparsity=0.3, stream="off", device="cpu"), None, Stats())
    assert isinstance(dense, torch.nn.Module)


def test_path_stage_streamed_has_the_same_key_and_table(chain):  # noqa: F811
    """``stream`` is not in the path's key; forced, the streamed path stage writes the
    in-memory table again (1e-5)."""
    import pandas as pd

    from gprune.configs.allocate import AllocateConfig
    from gprune.methods.registry import build_method
    from tasks.partition import run_partition
    from tasks.path import run_path
    from tasks.score import run_score

    store, _, stats = chain
    method = build_method("gprune")
    partition = run_partition(method.partition_config(), store, stats)
    score = run_score(method.score_config(), store, stats, partition)
    config = AllocateConfig(sparsity=0.5, steps=3, n_sequences=2, seq_len=32, stream="off")
    key = run_path(config, store, score, stats)
    want = pd.read_parquet(store.read(key).file("path.parquet"))
    streamed = run_path(config.model_copy(update={"stream": "on"}), store, score, stats,
                        force=True)
    assert streamed == key and "stream" not in config.path_params()
    got = pd.read_parquet(store.read(key).file("path.parquet"))
    for column in ("a", "b"):
        np.testing.assert_allclose(got[column], want[column], rtol=RTOL, atol=RTOL)
