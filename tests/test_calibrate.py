"""One calibration pass for capture and Grams: equal to the two separate passes, stored
under the gram stage's own key, and used by the flow instead of a second forward pass."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from artifacts.store import ArtifactStore
from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.gram import GramConfig
from gprune.errors import ConfigError
from gprune.maths.calibrate import capture_with_grams
from gprune.maths.capture import NonFiniteActivationError, capture_statistics
from gprune.maths.gram import accumulate_grams
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import nan_model, no_hooks
from tasks.capture import ShortSourceWarning, run_capture
from tasks.corpus import run_corpus
from tasks.gram import read_gram, run_gram

SETTINGS = dict(n_sequences=4, seq_len=160, batch_size=2, device="cpu")


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (5, 24), generator=gen)
    mask = torch.ones(5, 24, dtype=torch.long)
    mask[1, 17:], mask[3, 5:] = 0, 0                                  # padded rows
    return ids, mask


def test_joint_pass_equals_the_two_separate_passes(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    ids, mask = padded_batch()
    capture, grams = capture_with_grams(model, adapter, ids, mask, 2, label="x",
                                        progress=False)
    assert no_hooks(model)
    alone = capture_statistics(model, adapter, ids, mask, 2, progress=False)
    gram_alone = accumulate_grams(model, adapter, ids, mask, 2, progress=False)
    assert capture.tokens == alone.tokens == grams.tokens == gram_alone.tokens == int(mask.sum())
    pd.testing.assert_frame_equal(capture.channels, alone.channels, rtol=1e-12)
    pd.testing.assert_frame_equal(capture.layers, alone.layers, rtol=1e-12)
    for layer in range(grams.num_layers):
        for kind, got in grams.layer(layer).items():
            want = gram_alone.layer(layer)[kind]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_a_nan_names_the_activation_and_removes_every_hook():
    model, adapter = nan_model()
    ids, mask = padded_batch()
    with pytest.raises(NonFiniteActivationError, match=r"layer 1 of source 'wiki'"):
        capture_with_grams(model, adapter, ids, mask, 2, label="wiki", progress=False)
    assert no_hooks(model)


@pytest.fixture
def corpus(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    path = tmp_path / "fox.txt"
    path.write_text("".join(f"The quick brown fox number {i} jumps over the lazy dog.\n\n"
                            for i in range(12)))
    return store, run_corpus(CorpusConfig(source=str(path)), store), str(path)


def test_capture_stores_the_gram_artifact_the_gram_stage_would_build(corpus, tmp_path):
    store, corpus_key, source = corpus
    config = CaptureConfig(source=source, **SETTINGS)
    companion = GramConfig.from_capture(config, storage_dtype="float64")
    with pytest.warns(ShortSourceWarning):
        run_capture(config, store, "tiny:qwen2", corpus_key, gram=companion)
    [stored] = [a for a in store.list() if a.stage == "gram"]
    manifest = store.path(stored.key) / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    assert run_gram(companion, store, "tiny:qwen2", corpus_key) == stored.key   # reused
    assert manifest.stat().st_mtime_ns == mtime
    other = ArtifactStore(tmp_path / "other")                    # the gram stage's own pass
    other_corpus = run_corpus(CorpusConfig(source=source), other)
    with pytest.warns(ShortSourceWarning):
        alone = run_gram(companion, other, "tiny:qwen2", other_corpus)
    assert alone == stored.key
    for layer in range(3):
        joint, own = read_gram(store, stored.key, layer), read_gram(other, alone, layer)
        for kind in own:
            torch.testing.assert_close(joint[kind], own[kind], rtol=1e-12, atol=1e-9)
    assert stored.extra["tokens"] == store.read(stored.key).extra["tokens"] > 0


def test_a_gram_config_of_other_tokens_is_refused(corpus):
    store, corpus_key, source = corpus
    config = CaptureConfig(source=source, **SETTINGS)
    other = GramConfig(source=source, **{**SETTINGS, "seq_len": 64})
    with pytest.raises(ConfigError, match="does not select the tokens"):
        run_capture(config, store, "tiny:llama", corpus_key, gram=other)
    assert not store.list()[1:]   # only the corpus


def test_the_flow_accumulates_grams_in_the_capture_pass(prefect_api, tmp_path, monkeypatch):
    import tasks.gram
    from flows.gprune_flow import gprune_flow

    def second_pass(*args, **kwargs):
        raise AssertionError("the gram stage ran its own forward pass")

    monkeypatch.setattr(tasks.gram, "accumulate_grams", second_pass)
    config = dict(model="tiny:llama", sources=["wikipedia", "docs"], sparsities=[0.3],
                  methods=["wanda_sp:reconstruct=lsq"], capture_sequences=2,
                  capture_seq_len=32, capture_batch_size=2, evaluate=False, device="cpu")
    result = gprune_flow(config=config, store=str(tmp_path / "store"))
    assert set(result["gram_keys"]) == {"wikipedia", "docs"}
    store = ArtifactStore(tmp_path / "store")
    assert all(store.read(key).extra["tokens"] == 64 for key in result["gram_keys"].values())
