"""Stats stage: metrics against hand-computed values, ranks and sensitivity, the artifact."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.stats import StatsConfig
from gprune.errors import ArtifactError, ConfigError, GpruneError
from gprune.maths.stats import LayerWeights, magnitude, scaled_rank, sensitivity
from gprune.maths.stats_tables import pooled_channels, units_table
from gprune.models.loader import load_model, resolve_model
from tasks.capture import check_token_count, run_capture
from tasks.corpus import run_corpus
from tasks.stats import run_stats

# ---- a hand-computed case: one layer, 3 MLP channels, 2 heads of head_dim 2 ----------
T = torch.tensor
WEIGHTS = LayerWeights(
    mlp_out=T([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]], dtype=torch.float64),   # (hidden 2, I 3)
    mlp_in=(T([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64),  # gate rows: 5, 1, 2
            T([[0.0, 1.0], [2.0, 0.0], [0.0, 8.0]], dtype=torch.float64)),  # up rows: 1, 2, 8
    attn_out=T([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0]], dtype=torch.float64),  # (2, 4)
    attn_q=T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64))


def _frame(mlp: dict, attn: dict) -> pd.DataFrame:
    rows = []
    for kind, stats in (("mlp", mlp), ("attn", attn)):
        for c in range(len(stats["sum"])):
            rows.append(dict(layer=0, kind=kind, channel=c, count=stats["count"],
                             sum=stats["sum"][c], sumsq=stats["sumsq"][c], sum_abs=0.0,
                             active=stats["active"][c]))
    return pd.DataFrame(rows)


SOURCE_A = _frame(dict(count=4, sum=[4, 0, 8], sumsq=[8, 16, 16], active=[1, 2, 4]),
                  dict(count=4, sum=[0, 0, 0, 0], sumsq=[4, 4, 16, 0], active=[4, 0, 2, 2]))
SOURCE_B = _frame(dict(count=2, sum=[0, 2, 2], sumsq=[2, 8, 2], active=[0, 1, 2]),
                  dict(count=2, sum=[0, 0, 0, 0], sumsq=[2, 2, 0, 8], active=[2, 2, 0, 0]))


def _hand_units():
    return units_table([SOURCE_A, SOURCE_B], [WEIGHTS], head_dim=2,
                       metrics=StatsConfig().channel_metrics())


def test_mlp_metrics_match_hand_computation():
    mlp = _hand_units().query("kind == 'mlp'").reset_index(drop=True)
    # wanda_sp = RMS * mean|W_out col| with mean|col| = (2, 1, 2):
    # A: rms (sqrt2, 2, 2); B: rms (1, 2, 1)
    np.testing.assert_allclose(np.stack(mlp.wanda_sp), [[2 * math.sqrt(2), 2], [2, 2], [4, 2]])
    # flap = Var * ||W_out col||^2 with ||.||^2 = (10, 4, 16): A var (1, 4, 0); B var (1, 3, 0)
    np.testing.assert_allclose(np.stack(mlp.flap), [[10, 10], [16, 12], [0, 0]])
    # ranks: A wanda order c1 < c0 < c2; B all tied -> 0.5
    np.testing.assert_allclose(np.stack(mlp.wanda_sp_rank), [[0.5, 0.5], [0, 0.5], [1, 0.5]])
    np.testing.assert_allclose(mlp.wanda_sp_sensitivity, [0, 0.25, 0.25])
    # flap order c2 < c0 < c1 in both sources: identical order -> sensitivity 0
    np.testing.assert_allclose(np.stack(mlp.flap_rank), [[0.5, 0.5], [1, 1], [0, 0]])
    np.testing.assert_allclose(mlp.flap_sensitivity, [0, 0, 0])
    mean_a = (2 * math.sqrt(2) + 2 + 4) / 3
    np.testing.assert_allclose(mlp.wanda_sp_magnitude, [(2 * math.sqrt(2) / mean_a + 1) / 2,
                                                        (2 / mean_a + 1) / 2, (4 / mean_a + 1) / 2])
    np.testing.assert_allclose(mlp.flap_magnitude, [(10 / (26 / 3) + 10 / (22 / 3)) / 2,
                                                    (16 / (26 / 3) + 12 / (22 / 3)) / 2, 0])
    # peak: the larger of the two sources' layer-normalized scores (B's wanda scores all 2)
    np.testing.assert_allclose(mlp.wanda_sp_peak, [max(2 * math.sqrt(2) / mean_a, 1),
                                                   max(2 / mean_a, 1), max(4 / mean_a, 1)])
    np.testing.assert_allclose(mlp.flap_peak, [max(10 / (26 / 3), 10 / (22 / 3)),
                                               max(16 / (26 / 3), 12 / (22 / 3)), 0])
    # pooled over 6 tokens: c0 sum 4, sumsq 10 -> rms sqrt(10/6), var 10/6 - (2/3)^2
    assert mlp.wanda_sp_pooled[0] == pytest.approx(math.sqrt(10 / 6) * 2)
    assert mlp.flap_pooled[0] == pytest.approx((10 / 6 - 4 / 9) * 10)
    np.testing.assert_allclose(mlp.freq, [(1 / 4 + 0) / 2, (2 / 4 + 1 / 2) / 2, 1])
    # ||W_out col|| * sqrt(||gate row|| * ||up row||)
    np.testing.assert_allclose(mlp.weight_score, [math.sqrt(10) * math.sqrt(5), 2 * math.sqrt(2),
                                                  4 * 4])


def test_head_metrics_aggregate_their_channels():
    heads = _hand_units().query("kind == 'attn'").reset_index(drop=True)
    assert list(heads.unit) == [0, 1]
    # channel wanda A: rms (1, 1, 2, 0) * mean|W_o col| (.5, .5, 1, .5) -> heads (1, 2);
    # B: rms (1, 1, 0, 2) -> (.5, .5, 0, 1) -> heads (1, 1)
    np.testing.assert_allclose(np.stack(heads.wanda_sp), [[1, 1], [2, 1]])
    # flap A: var (1, 1, 4, 0) * (1, 1, 4, 1) -> heads (2, 16); B var (1, 1, 0, 4) -> (2, 4)
    np.testing.assert_allclose(np.stack(heads.flap), [[2, 2], [16, 4]])
    np.testing.assert_allclose(heads.flap_sensitivity, [0, 0])
    np.testing.assert_allclose(heads.freq, [(0.5 + 1) / 2, (0.5 + 0) / 2])
    # ||W_o[:, head cols]||_F * ||W_q[head rows]||_F: sqrt2 * sqrt2, sqrt5 * sqrt6
    np.testing.assert_allclose(heads.weight_score, [2, math.sqrt(30)])
    pooled = pooled_channels([SOURCE_A, SOURCE_B]).query("kind == 'attn'")
    np.testing.assert_allclose(pooled["count"], 6)
    np.testing.assert_allclose(pooled["var"], [1, 1, 16 / 6, 8 / 6])


def test_rank_and_sensitivity_rules():
    np.testing.assert_allclose(scaled_rank(np.array([3.0, 1.0, 2.0, 2.0])), [1, 0, 0.5, 0.5])
    np.testing.assert_allclose(scaled_rank(np.array([7.0])), [1])
    same_order = np.array([[1.0, 10.0, 5.0], [2.0, 20.0, 6.0], [3.0, 30.0, 7.0]])
    ranks = np.stack([scaled_rank(same_order[:, d]) for d in range(3)], axis=1)
    np.testing.assert_allclose(sensitivity(ranks), 0)
    swapped = np.array([[1.0, 2.0], [2.0, 1.0]])
    np.testing.assert_allclose(sensitivity(swapped), [0.5, 0.5])
    assert np.isnan(sensitivity(ranks[:, :1])).all()
    np.testing.assert_allclose(magnitude(np.zeros((3, 2))), 0)


# ---- the stage on tiny captures -------------------------------------------------------
@pytest.fixture
def corpus_key(store, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}: " + "some words and more words " * 8
                                for i in range(8)))
    return run_corpus(CorpusConfig(source=str(text)), store)


def _capture(store, corpus_key, source, model="tiny:llama", seed=0):
    config = CaptureConfig(source=source, n_sequences=3, seq_len=32, batch_size=2, seed=seed)
    return run_capture(config, store, model, corpus_key)


def test_stats_stage_on_two_sources_gqa(store, corpus_key):
    keys = [_capture(store, corpus_key, "a", seed=0), _capture(store, corpus_key, "b", seed=1)]
    artifact = store.read(run_stats(StatsConfig(), store, keys), stage="stats")
    assert artifact.extra["sources"] == ["a", "b"] and artifact.extra["capture_keys"] == keys
    shape = artifact.extra["shape"]
    units = pd.read_parquet(artifact.file("units.parquet"))
    heads = units.query("kind == 'attn'")
    assert len(heads) == shape["num_layers"] * shape["heads"]   # query heads, not KV heads
    assert shape["kv_heads"] < shape["heads"]
    for rank in np.concatenate(units.wanda_sp_rank.to_numpy()):
        assert 0.0 <= rank <= 1.0
    assert units.wanda_sp_sensitivity.notna().all() and (units.flap_magnitude >= 0).all()
    assert (units.wanda_sp_peak >= units.wanda_sp_magnitude - 1e-12).all()   # max >= mean
    # a head's pooled score is the sum of its channels' scores (pooled channel stats)
    model, _, adapter = load_model(resolve_model("tiny:llama"), "cpu")
    channels = pd.read_parquet(artifact.file("channels.parquet"))
    channels = channels.query("layer == 1 and kind == 'attn'")
    w_o = adapter.attn_output(adapter.decoder_layers(model)[1]).weight.double()
    rms = np.sqrt(channels["var"] + channels["mean"] ** 2).to_numpy()
    per_channel = rms * w_o.abs().mean(0).detach().numpy()
    expected = per_channel.reshape(shape["heads"], shape["head_dim"]).sum(1)
    np.testing.assert_allclose(heads.query("layer == 1").wanda_sp_pooled, expected, rtol=1e-9)


def test_single_capture_has_nan_sensitivity(store, corpus_key):
    key = run_stats(StatsConfig(metrics=("flap",)), store, [_capture(store, corpus_key, "a")])
    units = pd.read_parquet(store.read(key).file("units.parquet"))
    assert units.flap_sensitivity.isna().all() and "wanda_sp" not in units.columns
    assert (units.flap.map(len) == 1).all()


def test_mismatched_models_and_bad_key_lists_are_refused(store, corpus_key):
    llama = _capture(store, corpus_key, "a")
    qwen = _capture(store, corpus_key, "b", model="tiny:qwen2")
    with pytest.raises(ArtifactError, match=f"{llama}.*{qwen}.*different models"):
        run_stats(StatsConfig(), store, [llama, qwen])
    with pytest.raises(ConfigError, match="more than once"):
        run_stats(StatsConfig(), store, [llama, llama])
    with pytest.raises(ConfigError, match="at least one"):
        run_stats(StatsConfig(), store, [])
    assert not list((store.root / "stats").glob("*/manifest.json"))


def test_capture_artifact_records_short_sources(store, corpus_key):
    config = CaptureConfig(source="few", n_sequences=500, seq_len=64, batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        key = run_capture(config, store, "tiny:llama", corpus_key)
    extra = store.read(key, stage="capture").extra
    assert 0 < extra["tokens"] < extra["requested_tokens"] == 500 * 64
    assert any("only" in str(w.message) for w in caught)
    channels = pd.read_parquet(store.read(key).file("channels.parquet"))
    assert (channels["count"] == extra["tokens"]).all()
    assert extra["family"] == "llama" and extra["source"] == "few"
    with pytest.raises(GpruneError, match="no tokens"):
        check_token_count(0, config)


def test_a_changed_model_folder_is_refused(store, corpus_key, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(resolve_model("tiny:llama").path, folder)
    keys = [_capture(store, corpus_key, "a", model=str(folder)),
            _capture(store, corpus_key, "b", model=str(folder), seed=1)]
    config = folder / "config.json"
    config.write_text(config.read_text().replace("{", '{"edited": 1, ', 1))
    with pytest.raises(ArtifactError, match="changed since it was captured"):
        run_stats(StatsConfig(), store, keys)
