"""FANG (arXiv 2512.23014): token contexts, groups, token-weighted scores, block sparsity.

Brute force: token weights and in-group scores recomputed token by token in numpy; the
sampled MLP inputs and activations against our own hooks keeping every real token; the
linear assignment against every balanced assignment of a tiny layer.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from gprune.errors import ConfigError
from gprune.maths.allocate import harden, project
from gprune.maths.contexts import (ContextCapture, context_distances, context_weights,
                                   kmeans, mlp_blocks, pca, sample_rows)
from gprune.maths.fang import (SHARED, assign_groups, block_sparsity, fang_fractions,
                               group_scores, weighted_flap, weighted_obs)
from gprune.maths.hooked import feed_batches
from gprune.methods.fang import Fang, FangObc
from gprune.methods.registry import build_method
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import TINY_SHAPE, random_units


def synthetic_contexts(shape=TINY_SHAPE, n=120, k=3, dim=5, seed=0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(shape.num_layers):
        z = torch.randn(n, dim, generator=gen)
        out.append({"z": z, "acts": torch.randn(n, shape.intermediate, generator=gen) *
                    torch.rand(shape.intermediate, generator=gen) * 3,
                    "centroids": kmeans(z, k, seed).float(),
                    "w_out_sq": torch.rand(shape.intermediate, generator=gen) + 0.1})
    return out


def fang_scores(method=None, seed=0, cosine=None):
    method = method or Fang(k=3, pca_dim=5, sample_tokens=120)
    units = random_units(seed=seed)
    modules = units[["layer", "kind", "unit"]].assign(module=0)
    cos = cosine if cosine is not None else np.linspace(0.9, 0.6, TINY_SHAPE.num_layers)
    layers = pd.DataFrame({"layer": range(TINY_SHAPE.num_layers), "cosine": cos})
    return method.score_units(units, modules, contexts=synthetic_contexts(seed=seed),
                              layers=layers, **method.score_settings())[0]


# ---- token weights and in-group scores: brute force ----------------------------------
def test_token_weights_are_a_softmax_over_tokens_of_scaled_distances():
    gen = torch.Generator().manual_seed(1)
    z, centroids = torch.randn(40, 4, generator=gen), torch.randn(3, 4, generator=gen)
    dist = context_distances(z, centroids)
    raw = np.array([[np.linalg.norm(z[t] - centroids[j]) for j in range(3)] for t in range(40)])
    np.testing.assert_allclose(dist.numpy(), raw / raw.mean(), rtol=1e-6)
    alpha = context_weights(dist, 0.3).numpy()
    for j in range(3):
        e = np.exp(-raw[:, j] / raw.mean() / 0.3)
        np.testing.assert_allclose(alpha[:, j], 40 * e / e.sum(), rtol=1e-6)


def test_weighted_scores_equal_brute_force():
    gen = torch.Generator().manual_seed(2)
    acts, w, wsq = torch.randn(60, 7, generator=gen), torch.rand(60, generator=gen), \
        torch.rand(7, generator=gen)
    x, a = acts.double().numpy(), w.double().numpy()
    for c in range(7):                       # FLAP: weighted variance x ||W_out[:, c]||^2
        mean = sum(a[t] * x[t, c] for t in range(60)) / a.sum()
        var = sum(a[t] * (x[t, c] - mean) ** 2 for t in range(60)) / a.sum()
        assert math.isclose(weighted_flap(acts, w, wsq)[c].item(), var * wsq[c].item(),
                            rel_tol=1e-9)
    gram = sum(a[t] * np.outer(x[t], x[t]) for t in range(60)) / a.sum()
    gram += 1e-2 * np.trace(gram) / 7 * np.eye(7)                        # OBS: damped Gram
    want = wsq.double().numpy() / np.diag(np.linalg.inv(gram))
    np.testing.assert_allclose(weighted_obs(acts, w, wsq).numpy(), want, rtol=1e-9)


@pytest.mark.parametrize("variant", ["flap", "obc"])
def test_group_scores_weight_each_group_by_its_context(variant):
    gen = torch.Generator().manual_seed(3)
    acts, alpha = torch.randn(50, 12, generator=gen), torch.rand(50, 3, generator=gen)
    wsq = torch.rand(12, generator=gen)
    labels = np.array([0, 1, 2, 3] * 3)
    got = group_scores(acts, alpha, labels, wsq, variant)
    score = weighted_flap if variant == "flap" else weighted_obs
    for g in range(4):
        cols = np.flatnonzero(labels == g)
        weights = torch.ones(50, dtype=torch.float64) if g == SHARED else alpha[:, g - 1]
        np.testing.assert_allclose(got[cols], score(acts[:, cols], weights, wsq[cols]).numpy())


# ---- groups --------------------------------------------------------------------------
@pytest.mark.parametrize("c, k, shared", [(96, 7, True), (50, 3, True), (1536, 7, True),
                                           (50, 3, False), (41, 1, True), (40, 1, False)])
def test_groups_have_equal_sizes_and_cover_every_channel_once(c, k, shared):
    assoc = torch.rand(k, c, generator=torch.Generator().manual_seed(c)).double()
    labels = assign_groups(assoc, shared)
    assert labels.shape == (c,) and set(labels.tolist()) == set(range(1 - shared, k + 1))
    sizes = np.bincount(labels)[1 - shared:]
    assert sizes.sum() == c and sizes.max() - sizes.min() <= 1


def test_the_assignment_maximizes_total_association_against_brute_force():
    assoc = torch.rand(2, 6, generator=torch.Generator().manual_seed(4)).double()
    labels = assign_groups(assoc, shared=False)
    norm = (assoc / assoc.mean(1, keepdim=True)).numpy()
    value = lambda lab: sum(norm[lab[c] - 1, c] for c in range(6))  # noqa: E731
    best = max(value([1 + (c in first) for c in range(6)])
               for first in itertools.combinations(range(6), 3))
    assert math.isclose(value(labels), best) and np.bincount(labels)[1:].tolist() == [3, 3]


def test_the_shared_group_holds_the_channels_every_context_ranks_top():
    assoc = torch.ones(3, 40, dtype=torch.float64)
    assoc[:, [5, 17, 33]] = 10.0                       # top of every context
    for j in range(3):
        assoc[j, 20 + j] = 9.0                         # top of one context only
    shared = np.flatnonzero(assign_groups(assoc) == SHARED)
    assert {5, 17, 33} <= set(shared.tolist()) and len(shared) == 10


# ---- allocation: block sparsity, floors, budget --------------------------------------
def test_block_sparsities_average_to_the_target_and_follow_functional_complexity():
    rng = np.random.default_rng(5)
    for target in (0.2, 0.3, 0.4, 0.6):
        cosine = rng.uniform(0.3, 0.99, size=30)
        s = block_sparsity(cosine, target)
        assert abs(s.mean() - target) < 5e-3
        order = np.argsort(1 - cosine)                 # more complex blocks, lower sparsity
        assert np.all(np.diff(s[order]) <= 1e-12)
        if s.min() > 0 and s.max() < 0.95:            # unclipped: the [0.5 S, 1.5 S] range
            assert math.isclose(s.max() - s.min(), target, rel_tol=1e-9)


@pytest.mark.parametrize("sparsity, floor", [(0.3, 1.0), (0.5, 1.0), (0.6, 0.8)])
def test_plans_meet_the_budget_and_never_cut_the_shared_group_below_its_floor(sparsity, floor):
    scores = fang_scores(Fang(k=3, pca_dim=5, sample_tokens=120, shared_floor=floor))
    fractions = fang_fractions(scores, TINY_SHAPE, sparsity, True)
    alloc = project(fractions, TINY_SHAPE, sparsity, 0.1, True)
    kept = alloc.kept_params(TINY_SHAPE)
    total = TINY_SHAPE.layer_params(TINY_SHAPE.intermediate, TINY_SHAPE.heads,
                                    TINY_SHAPE.kv_heads) * TINY_SHAPE.num_layers
    assert abs((1 - kept / total) - sparsity) <= 0.005
    layers = harden(scores, alloc, TINY_SHAPE)
    for layer in layers:
        mlp = scores[(scores.layer == layer["layer"]) & (scores.kind == "mlp")]
        shared = set(mlp[mlp.module == SHARED].unit)
        kept_shared = len(shared & set(layer["mlp_keep"]))
        assert kept_shared >= math.ceil(floor * len(shared) - 1e-9)
        heads_by_group = {h // TINY_SHAPE.group_size for h in layer["heads_keep"]}
        assert heads_by_group == set(layer["kv_keep"])          # GQA-feasible


def test_groups_are_the_plans_modules_and_ranks_stay_inside_them():
    scores = fang_scores()
    mlp = scores[scores.kind == "mlp"]
    assert mlp.groupby("layer").module.nunique().eq(4).all()
    for _, group in mlp.groupby(["layer", "module"]):
        assert group.score.max() == 1.0 and group.score.min() == 0.0


def test_same_seed_same_scores_other_variant_other_scores():
    a, b = fang_scores(), fang_scores()
    pd.testing.assert_frame_equal(a, b)
    obc = fang_scores(FangObc(k=3, pca_dim=5, sample_tokens=120))
    assert not np.allclose(a.raw, obc.raw)


# ---- the contexts sample and clustering ----------------------------------------------
def test_sampled_tokens_equal_the_hooked_rows_with_padding():
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    ids = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0                                               # 10 + 7 + 4 = 21 real
    seen = {"in": [], "act": []}
    block, down = mlp_blocks(model, adapter)[1]
    hooks = [block.register_forward_pre_hook(lambda m, a: seen["in"].append(a[0])),
             down.register_forward_pre_hook(lambda m, a: seen["act"].append(a[0]))]
    rows = sample_rows(21, 9, seed=0)
    with ContextCapture(model, adapter, rows) as cap:
        feed_batches(cap, ids, mask, 2, "", False, lambda *a: AssertionError(a))
    for h in hooks:
        h.remove()
    real = lambda xs, masks: torch.cat([x.reshape(-1, x.shape[-1])[m[:, :x.shape[1]]  # noqa: E731
                                        .reshape(-1).bool()] for x, m in zip(xs, masks)])
    masks = [mask[:2], mask[2:]]
    inputs, acts = cap.samples(1)
    torch.testing.assert_close(inputs, real(seen["in"], masks)[rows].float())
    torch.testing.assert_close(acts, real(seen["act"], masks)[rows].float())


def test_pca_and_kmeans_are_deterministic_and_recover_separated_clusters():
    gen = torch.Generator().manual_seed(7)
    centers = torch.randn(3, 10, generator=gen) * 10
    x = torch.cat([c + torch.randn(30, 10, generator=gen) for c in centers])
    mean, basis = pca(x, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=basis.dtype))
    z = (x.double() - mean) @ basis
    a, b = kmeans(z, 3, seed=0), kmeans(z, 3, seed=0)
    torch.testing.assert_close(a, b)
    labels = torch.cdist(z, a).argmin(1).reshape(3, 30)
    assert all(len(set(row.tolist())) == 1 for row in labels)     # each true cluster whole
    assert len({row[0].item() for row in labels}) == 3


# ---- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("fang:tau=0", "method fang: parameter tau:"),
    ("fang:tau=-1", "method fang: parameter tau:"),
    ("fang:k=40,sample_tokens=200", "k=40 contexts need at least 320 tokens"),
    ("fang_obc:pca_dim=300,sample_tokens=256", "pca_dim=300 needs more than 300 tokens"),
    ("fang:shared_floor=1.5", "method fang: parameter shared_floor:"),
])
def test_bad_fang_parameters_fail_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_method(spec)
    assert "\n" not in str(err.value)


def test_k_beyond_the_available_calibration_tokens_is_refused_before_the_pass():
    from gprune.maths.contexts import check_sample

    check_sample(7, 64, 2048, available=2048)
    with pytest.raises(ConfigError, match=r"k=7 contexts need at least 56 tokens, 40 are "
                                          r"available \(40 calibration tokens\)"):
        check_sample(7, 4, 2048, available=40)


def test_a_family_whose_mlp_input_cannot_be_hooked_is_refused():
    from dataclasses import replace

    model = tiny_model("llama")
    adapter = replace(adapter_for(model.config), mlp="feed_forward")
    with pytest.raises(ConfigError, match="MLP input of family llama cannot be hooked") as err:
        mlp_blocks(model, adapter)
    assert "\n" not in str(err.value)


def test_fang_needs_its_contexts():
    units = random_units()
    with pytest.raises(ConfigError, match="contexts"):
        Fang.score_units(units, units[["layer", "kind", "unit"]].assign(module=0),
                         **Fang().score_settings())


# ---- through the flow ------------------------------------------------------------------
TINY_FLOW = dict(model="tiny:llama", sources=["wikipedia", "docs"], sparsities=[0.3],
                 methods=["fang_flap:pca_dim=8,sample_tokens=160",
                          "fang_obc:pca_dim=8,sample_tokens=160"],
                 capture_sequences=4, capture_seq_len=32, capture_batch_size=2,
                 evaluate=False, mc_tasks=[], speed=False, device="cpu")


def test_the_flow_shares_one_contexts_artifact_and_same_seed_gives_same_plan(prefect_api,
                                                                          tmp_path):
    from artifacts.store import ArtifactStore
    from flows.gprune_flow import gprune_flow
    from gprune.maths.plan import PruningPlan

    plans = []
    for run in ("a", "b"):
        state = gprune_flow(config=TINY_FLOW, store=str(tmp_path / run), return_state=True)
        assert state.is_completed(), state.message
        store = ArtifactStore(tmp_path / run)
        assert len(list((tmp_path / run / "contexts").iterdir())) == 1   # both variants
        plans.append({name: PruningPlan.read(store.read(key, stage="allocate").path)
                      for name, key in state.result()["plans"].items()})
    for name, plan in plans[0].items():
        assert abs(plan.achieved_sparsity - 0.3) <= 0.005
        assert plan.reconstruct == ("lsq" if name.startswith("fang_obc") else "bias")
        assert plan.layers == plans[1][name].layers
