"""The learned allocator lowers its objective and its hardened plan meets the budget."""
import pytest
import torch

from gprune.maths.allocate import harden, project
from gprune.maths.learned import LearnSettings, build_layout, expected_keep, learn_fractions
from gprune.maths.learned_path import PathSettings, learn_path, path_fractions
from gprune.maths.partition import partition_units
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.score import score_units
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import random_units


def _setup(family="llama"):
    model = tiny_model(family, seed=3)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    units = random_units(shape, sources=3, seed=4)
    scores, _ = score_units(units, partition_units(units, 2, "wanda_sp"), "wanda_sp", "wanda_sp")
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 24), generator=gen), torch.ones(2, 24, dtype=torch.long))
               for _ in range(2)]
    return model, adapter, shape, scores, batches


def test_learned_allocator_lowers_objective_and_meets_budget():
    model, adapter, shape, scores, batches = _setup()
    settings = LearnSettings(steps=25, lr=0.2, t_start=0.05, t_end=0.05)
    fractions, history = learn_fractions(model, adapter, shape, scores, batches, 0.4, settings)
    assert len(history) == 25
    assert sum(history[-4:]) / 4 < sum(history[:2]) / 2
    alloc = project(fractions, shape, 0.4, 0.1, True)
    layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]), tuple(l["kv_keep"]))
                   for l in harden(scores, alloc, shape))
    plan = PruningPlan("fp", "llama", "gprune", 0.4, shape, layers)
    plan.check()
    assert abs(plan.achieved_sparsity - 0.4) <= 0.005
    assert all(p.grad is None for p in model.parameters())        # model weights were never trained


def test_soft_masks_are_removed_and_budget_is_exact_at_start():
    model, adapter, shape, scores, batches = _setup("qwen2")
    layout = build_layout(scores, shape, prune_attention=True)
    half = torch.full((len(layout.names),), 0.5)
    assert abs(float(expected_keep(half, layout, shape)) - 0.5) < 1e-6
    before = model(batches[0][0]).logits
    learn_fractions(model, adapter, shape, scores, batches, 0.3, LearnSettings(steps=2))
    after = model(batches[0][0]).logits
    assert torch.equal(before, after)                              # hooks gone, model untouched


def test_learned_path_serves_every_target_within_budget():
    model, adapter, shape, scores, batches = _setup("qwen2")
    settings = PathSettings(steps=12, lr=0.2, grid=(0.2, 0.4))
    table, history = learn_path(model, adapter, shape, scores, batches, settings)
    assert len(history) == 12 and set(table.columns) >= {"kind", "layer", "module", "a", "b"}
    assert not ((table.a == 0).all() and (table.b == 1).all())      # the path moved
    kept = []
    for sparsity in (0.2, 0.3, 0.4):
        fractions = path_fractions(table, scores, shape, sparsity, True)
        alloc = project(fractions, shape, sparsity, 0.1, True)
        layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]),
                                 tuple(l["kv_keep"])) for l in harden(scores, alloc, shape))
        plan = PruningPlan("fp", "qwen2", "gprune", sparsity, shape, layers)
        plan.check()
        assert abs(plan.achieved_sparsity - sparsity) <= 0.005
        kept.append(sum(fractions.mlp.values()))
    assert kept[0] > kept[1] > kept[2]                               # more sparsity, less kept
    assert all(p.grad is None for p in model.parameters())


def test_path_of_other_scores_is_refused():
    model, adapter, shape, scores, batches = _setup()
    table, _ = learn_path(model, adapter, shape, scores, batches, PathSettings(steps=1))
    with pytest.raises(ValueError, match="does not match"):
        path_fractions(table.iloc[1:], scores, shape, 0.3, True)
