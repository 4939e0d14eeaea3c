"""Stages 3-5 on constructed statistics: partition, gated scoring, allocation invariants."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gprune.configs.allocate import AllocateConfig
from gprune.configs.partition import PartitionConfig
from gprune.errors import ConfigError
from gprune.maths.allocate import flap_fractions, harden, project, uniform_fractions
from gprune.maths.budget import check_target, head_config_for, select_heads
from gprune.maths.partition import partition_units
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.score import score_units
from gprune.methods.registry import build_method
from gprune.models.adapters import ModelShape
from tests.synthetic import TINY_SHAPE, random_units, units_table

SHAPES = {
    "tiny_gqa": TINY_SHAPE,
    "tiny_mha": ModelShape(3, 64, 96, 4, 4, 16, True),
    "tiny_nongated": ModelShape(2, 64, 80, 4, 2, 16, False),
    "smollm2_like": ModelShape(4, 576, 1536, 9, 3, 64, True),
}


def _plan(units, shape, sparsity, method="gprune", allocator="uniform"):
    spec = build_method({"name": method, "allocator": allocator})
    modules = partition_units(units, spec.partition_config().k, "wanda_sp")
    scores, _ = spec.score_units(units, modules, **spec.score_config().settings)
    fractions = (flap_fractions if allocator == "flap" else uniform_fractions)(scores, shape, sparsity, True)
    alloc = project(fractions, shape, sparsity, 0.1, True)
    layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]), tuple(l["kv_keep"]))
                   for l in harden(scores, alloc, shape))
    return PruningPlan("fp", "llama", method, sparsity, shape, layers)


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("allocator", ["uniform", "flap"])
def test_plan_invariants(shape_name, sparsity, allocator):
    shape = SHAPES[shape_name]
    units = random_units(shape, sources=3, seed=1)
    plan = _plan(units, shape, sparsity, allocator=allocator)
    plan.check()  # sorted indices; kv_keep = groups of kept heads; equal heads per kept group
    assert abs(plan.achieved_sparsity - sparsity) <= 0.005
    for layer in plan.layers:
        assert len(layer.mlp_keep) >= np.ceil(0.1 * shape.intermediate)
        per_group = {g: sum(h // shape.group_size == g for h in layer.heads_keep) for g in layer.kv_keep}
        assert len(set(per_group.values())) <= 1
    again = _plan(units, shape, sparsity, allocator=allocator)
    assert again.to_json() == plan.to_json()


def test_partition_is_deterministic_and_k1_is_one_module():
    units = random_units(seed=2)
    first = partition_units(units, 4, "wanda_sp", seed=0)
    assert first.equals(partition_units(units, 4, "wanda_sp", seed=0))
    mlp = first[first.kind == "mlp"]
    assert set(mlp.module) == {0, 1, 2, 3}
    assert set(first[first.kind == "attn"].module) == {0}
    assert set(partition_units(units, 1, "wanda_sp").module) == {0}


def test_gate_sends_sensitive_weak_module_to_weight_metric():
    rng = np.random.default_rng(0)
    n, d = 40, 4
    stable = np.tile(np.linspace(5, 10, 30)[:, None], (1, d))          # same order on every source
    sensitive = np.stack([rng.permutation(np.linspace(0.1, 0.5, 10)) for _ in range(d)], axis=1)
    scores = np.concatenate([stable, sensitive])
    units = units_table({(0, "mlp"): scores, (0, "attn"): np.ones((4, d)) + np.arange(4)[:, None]},
                        {(0, "mlp"): np.arange(n, dtype=float) + 1, (0, "attn"): np.ones(4)})
    modules = pd.DataFrame({"layer": 0, "kind": ["mlp"] * n + ["attn"] * 4,
                            "unit": list(range(n)) + list(range(4)),
                            "module": [0] * 30 + [1] * 10 + [0] * 4})
    scored, summary = score_units(units, modules, "wanda_sp", "wanda_sp")
    used = summary.set_index(["kind", "module"]).metric_used
    assert used[("mlp", 1)] == "weight" and used[("mlp", 0)] == "activation"
    weak = scored[(scored.kind == "mlp") & (scored.module == 1)]
    weights = units[(units.kind == "mlp") & (units.unit >= 30)].weight_score
    assert np.allclose(weak.raw.to_numpy(), weights.to_numpy())


def test_identical_orders_make_every_module_reliable():
    base = np.linspace(0.1, 3.0, 40)[:, None]
    scores = base * np.array([[1.0, 2.0, 0.5]])                         # same order, other scale
    units = units_table({(0, "mlp"): scores, (0, "attn"): np.ones((4, 3))},
                        {(0, "mlp"): np.ones(40), (0, "attn"): np.ones(4)})
    assert np.allclose(units[units.kind == "mlp"].wanda_sp_sensitivity, 0.0)
    modules = partition_units(units, 4, "wanda_sp")
    _, summary = score_units(units, modules, "wanda_sp", "wanda_sp")
    assert (summary.metric_used == "activation").all()


def test_dominant_unit_cannot_crowd_out_other_modules():
    """A unit huge on one source wins only inside its own module; other modules keep their share."""
    scores = np.ones((40, 2)) + np.arange(40)[:, None] * 0.01
    scores[0, 0] = 1e6
    units = units_table({(0, "mlp"): scores, (0, "attn"): np.ones((4, 2)) + np.arange(4)[:, None]},
                        {(0, "mlp"): np.ones(40), (0, "attn"): np.ones(4)})
    modules = pd.DataFrame({"layer": 0, "kind": ["mlp"] * 40 + ["attn"] * 4,
                            "unit": list(range(40)) + list(range(4)),
                            "module": [i // 10 for i in range(40)] + [0] * 4})
    scored, _ = score_units(units, modules, "wanda_sp", "wanda_sp", gate=False)
    mlp = scored[scored.kind == "mlp"]
    assert mlp.groupby("module").score.max().tolist() == [1.0, 1.0, 1.0, 1.0]
    shape = ModelShape(1, 64, 40, 4, 2, 16, True)
    alloc = project(uniform_fractions(scored, shape, 0.5, False), shape, 0.5, 0.1, False)
    kept = [alloc.mlp_counts[(0, m)] for m in range(4)]
    assert max(kept) - min(kept) <= 1


def test_select_heads_keeps_equal_heads_per_group():
    scores = np.array([9, 1, 1, 8, 7, 6, 0, 0, 5.0])                   # 3 groups of 3
    heads, groups = select_heads(scores, 3, 2, 2)
    assert groups == [1, 2] or groups == [0, 1]
    assert len(heads) == 4 and all(sum(h // 3 == g for h in heads) == 2 for g in groups)
    assert head_config_for(SHAPES["smollm2_like"], 7.2) == (3, 2)
    assert head_config_for(SHAPES["smollm2_like"], 0.2) == (0, 0)


@pytest.mark.parametrize("values", [
    {"sparsity": 0.0}, {"sparsity": 1.0}, {"sparsity": -0.1}, {"sparsity": 1.5},
    {"sparsity": 0.3, "allocator": "magic"}, {"sparsity": 0.3, "mlp_floor": 0.0},
    {"sparsity": 0.3, "t_start": 0.01, "t_end": 0.1}, {"sparsity": 0.3, "steps": 0},
    {"sparsity": 0.3, "path_grid": []}, {"sparsity": 0.3, "path_grid": [0.2, 1.0]},
])
def test_invalid_allocate_configs_raise(values):
    with pytest.raises(ConfigError):
        AllocateConfig.build(**values)


def test_plan_key_params_depend_only_on_what_shapes_the_plan():
    path = AllocateConfig(sparsity=0.3)
    assert path.learn_steps == 48 and "steps" not in path.key_params()   # the path carries them
    assert path.path_params()["path_grid"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert "sparsity" not in path.path_params()                           # one path, every target
    per_target = AllocateConfig(sparsity=0.3, allocator="learned")
    assert per_target.key_params()["steps"] == 30
    assert "lr" not in AllocateConfig(sparsity=0.3, allocator="uniform").key_params()


@pytest.mark.parametrize("values", [{"k": 0}, {"metric": "nope"}, {"seed": "x"}])
def test_invalid_partition_configs_raise(values):
    with pytest.raises(ConfigError):
        PartitionConfig.build(**values)


def test_unknown_method_and_impossible_target_and_big_k():
    with pytest.raises(ConfigError, match="known methods"):
        build_method("obs")
    with pytest.raises(ConfigError, match="impossible"):
        check_target(TINY_SHAPE, 0.8, 0.1, prune_attention=False)
    check_target(TINY_SHAPE, 0.5, 0.1, prune_attention=False)
    with pytest.raises(ConfigError, match="k=200"):
        partition_units(random_units(), 200, "wanda_sp")


def test_gate_needs_two_sources():
    units = random_units(sources=1)
    modules = partition_units(units, 2, "wanda_sp")
    with pytest.raises(ConfigError, match=">= 2"):
        score_units(units, modules, "wanda_sp", "wanda_sp", gate=True)
    scored, _ = score_units(units, modules, "wanda_sp", "wanda_sp", gate=False)
    assert scored.score.between(0, 1).all()


def test_peak_aggregate_keeps_a_unit_that_one_source_needs():
    """``peak``: a unit strong on one source only outranks units that are middling everywhere,
    which the mean over sources ranks above it; an unknown aggregate is refused by name."""
    scores = np.array([[1.0, 1.0, 6.0],     # a specialist: low on two sources, top on one
                       [2.5, 2.5, 2.5],     # middling everywhere
                       [3.0, 3.0, 0.5],
                       [0.5, 0.5, 0.5]])
    units = units_table({(0, "mlp"): scores, (0, "attn"): np.ones((4, 3))},
                        {(0, "mlp"): np.ones(4), (0, "attn"): np.ones(4)})
    modules = partition_units(units, 1, "wanda_sp")
    normalized = scores / scores.mean(axis=0, keepdims=True)
    by = {agg: score_units(units, modules, "wanda_sp", "wanda_sp", agg, gate=False)[0]
          .query("kind == 'mlp'").raw.to_numpy() for agg in ("normalized_mean", "peak")}
    np.testing.assert_allclose(by["normalized_mean"], normalized.mean(1))
    np.testing.assert_allclose(by["peak"], normalized.max(1))
    assert by["peak"][0] > by["peak"][1] and by["normalized_mean"][0] < by["normalized_mean"][1]
    with pytest.raises(ConfigError, match="aggregate must be one of"):
        score_units(units, modules, "wanda_sp", "wanda_sp", "median", gate=False)
