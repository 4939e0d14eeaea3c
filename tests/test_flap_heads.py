"""FLAP's head rule (reference ``lib/prune.py``, structure AL-AM) against a hand computation.

A tiny MHA model: 2 layers, hidden 2, 3 MLP channels, 2 heads of head_dim 2, one source.
Costs: an MLP channel removes 3 * 2 = 6 parameters, a head 4 * 2 * 2 = 16 (q, k, v, o);
prunable parameters 2 * (3 * 6 + 2 * 16) = 100.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gprune.configs.stats import StatsConfig
from gprune.maths.allocate import flap_fractions, flap_z, harden, project
from gprune.maths.stats import LayerWeights, flap_standardized
from gprune.maths.stats_tables import units_table
from gprune.methods.registry import build_method
from gprune.models.adapters import ModelShape

T = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
SHAPE = ModelShape(num_layers=2, hidden=2, intermediate=3, heads=2, kv_heads=2, head_dim=2,
                   gated=True)
# every column of down_proj has squared norm 1; o_proj's columns: 1, 4, 1, 1
W_DOWN = T([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])                     # (hidden 2, I 3)
W_O = T([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])               # (hidden 2, H * hd 4)
WEIGHTS = [LayerWeights(mlp_out=W_DOWN, mlp_in=(T([[1.0, 0.0]] * 3), T([[0.0, 1.0]] * 3)),
                        attn_out=W_O, attn_q=T([[1.0, 0.0]] * 4))] * 2
# per-channel variances (4 tokens, mean 0, so sumsq = 4 * var)
MLP_VAR = [0.0, 1.0, 2.0]                        # WIFV (0, 1, 2) in both layers
ATTN_VAR = {0: [2.0, 0.5, 0.0, 3.0],             # WIFV (2, 2, 0, 3): head sums 4 and 3
            1: [1.0, 0.0, 1.0, 1.0]}             # WIFV (1, 0, 1, 1): head sums 1 and 2


def _capture_frame() -> pd.DataFrame:
    rows = []
    for layer in range(2):
        for kind, var in (("mlp", MLP_VAR), ("attn", ATTN_VAR[layer])):
            rows += [dict(layer=layer, kind=kind, channel=c, count=4, sum=0.0, sumsq=4 * v,
                          sum_abs=0.0, active=4) for c, v in enumerate(var)]
    return pd.DataFrame(rows)


def _units() -> pd.DataFrame:
    return units_table([_capture_frame()], WEIGHTS, head_dim=2,
                       metrics=StatsConfig().channel_metrics())


def _flap_scores() -> pd.DataFrame:
    units = _units()
    method = build_method("flap")
    modules = units[["layer", "kind", "unit"]].assign(module=0)
    scores, _ = method.score_units(units, modules, **method.score_config().settings)
    return scores


# Hand computation.
# MLP, both layers: WIFV (0, 1, 2), mean 1, std (ddof=1) 1 -> z (-1, 0, 1).
# Layer 0 heads: WIFV^2 (4, 4, 0, 9), mean 4.25, deviations (-.25, -.25, -4.25, 4.75),
#   std = sqrt(40.75 / 3); head means (-.25, .25) / std: head 1 ahead, though its WIFV
#   sum (3) is below head 0's (4), and both near 0 (standardizing the two head sums
#   instead would force them to -1 and +1, head 0 first).
# Layer 1 heads: WIFV^2 (1, 0, 1, 1), mean .75, deviations (.25, -.75, .25, .25),
#   std = sqrt(.75 / 3) = .5; channel z (.5, -1.5, .5, .5); head means (-.5, .5).
STD0 = math.sqrt(40.75 / 3)
HEAD_Z = {(0, 0): -0.25 / STD0, (0, 1): 0.25 / STD0, (1, 0): -0.5, (1, 1): 0.5}
MLP_Z = [-1.0, 0.0, 1.0]


def test_standardization_of_channels_and_heads_by_hand():
    np.testing.assert_allclose(flap_standardized(T([0.0, 1.0, 2.0]), None), MLP_Z)
    np.testing.assert_allclose(flap_standardized(T([2.0, 2.0, 0.0, 3.0]), 2),
                               [HEAD_Z[(0, 0)], HEAD_Z[(0, 1)]])
    np.testing.assert_allclose(flap_standardized(T([1.0, 0.0, 1.0, 1.0]), 2), [-0.5, 0.5])
    np.testing.assert_allclose(flap_standardized(T([3.0, 3.0, 3.0, 3.0]), 2), [0.0, 0.0])


def test_stats_and_scores_carry_flaps_standardized_scores():
    scores = _flap_scores()
    heads = scores[scores.kind == "attn"]
    for (layer, head), want in HEAD_Z.items():
        row = heads[(heads.layer == layer) & (heads.unit == head)]
        assert row.z.item() == pytest.approx(want)
        assert row.raw.item() == pytest.approx(want)     # flap picks heads by this score
    np.testing.assert_allclose(flap_z(scores)[scores.kind.to_numpy() == "mlp"], MLP_Z * 2)
    units = _units()   # one source: magnitudes are the channel scores over their layer mean
    np.testing.assert_allclose(units.flap_magnitude_z, units.flap_pooled_z)


@pytest.mark.parametrize("sparsity, attn, heads_keep, mlp_keep", [
    # ranking (z, cost): mlp 1 (6) x2, L1h1 .5 (16), L0h1 .07 (16), mlp 0 (6) x2,
    # L0h0 -.07 (16), L1h0 -.5 (16), mlp -1 (6) x2; cumulative 6 12 28 44 50 56 72 88 94 100
    (0.28, {0: 1.0, 1: 0.5}, [[0, 1], [1]], [1, 2]),   # keep 72: every unit down to L0h0
    (0.44, {0: 0.5, 1: 0.5}, [[1], [1]], [1, 2]),      # keep 56 (head sums would pick L0h0)
    # keep 44.5 (the parameter count stops at 44): L0h1 comes before the z = 0 channels
    (0.555, {0: 0.5, 1: 0.5}, [[1], [1]], [2]),
])
def test_joint_threshold_keeps_the_hand_computed_heads(sparsity, attn, heads_keep, mlp_keep):
    scores = _flap_scores()
    fractions = flap_fractions(scores, SHAPE, sparsity, prune_attention=True)
    assert fractions.attn == pytest.approx(attn)
    mlp = len(mlp_keep) / 3
    assert fractions.mlp == pytest.approx({(0, 0): mlp, (1, 0): mlp})
    alloc = project(fractions, SHAPE, sparsity, 0.1, True)
    layers = harden(scores, alloc, SHAPE)
    assert [l["heads_keep"] for l in layers] == heads_keep
    assert all(l["mlp_keep"] == mlp_keep for l in layers)


def test_heads_without_channel_scores_fall_back_to_their_layer():
    """Weight-scored heads (z NaN) are standardized over their layer's heads (ddof=1)."""
    scores = pd.DataFrame({"layer": 0, "kind": ["mlp"] * 3 + ["attn"] * 2,
                           "raw": [0.0, 1.0, 2.0, 1.0, 2.0], "z": [np.nan] * 3 + [np.nan, 0.3]})
    h = 1 / math.sqrt(2)                                     # (1, 2): mean 1.5, std sqrt(.5)
    np.testing.assert_allclose(flap_z(scores), [-1.0, 0.0, 1.0, -h, 0.3])
