"""GISP: Taylor scores against brute force, nested trajectories, exact plans, bad input."""
import numpy as np
import pandas as pd
import pytest
import torch

from gprune.errors import ConfigError
from gprune.maths.allocate import harden
from gprune.maths.budget import prunable_params
from gprune.maths.gisp import (NEVER, GispSettings, check_settings, kept_at, removal_params,
                               trajectory)
from gprune.maths.gisp_taylor import margin_loss, masked_scores
from gprune.maths.learned import next_token_loss
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.methods.allocators import AllocationInputs
from gprune.methods.gisp import GispAllocator
from gprune.methods.registry import build_method
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import random_units
from gprune.maths.score import score_units
from gprune.maths.partition import partition_units


def _batches(seed=0, n=2, length=20):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, length), generator=gen),
             torch.ones(2, length, dtype=torch.long)) for _ in range(n)]


def _masks(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    alive_mlp = torch.rand(shape.num_layers, shape.intermediate, generator=gen) > 0.3
    alive_heads = torch.ones(shape.num_layers, shape.heads, dtype=torch.bool)
    alive_heads[0, 1] = False
    return alive_mlp, alive_heads


def _zeroed_copy(model, adapter, shape, alive_mlp, alive_heads):
    """The masked model built by zeroing weights instead of hooks."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(adapter.decoder_layers(twin)):
            adapter.mlp_output(layer).weight[:, ~alive_mlp[i]] = 0
            cols = (~alive_heads[i]).repeat_interleave(shape.head_dim)
            adapter.attn_output(layer).weight[:, cols] = 0
    return twin


def _brute_scores(model, adapter, shape, batches, alive_mlp, alive_heads):
    """|W * dL/dW| per structure with explicit loops over channels and heads."""
    twin = _zeroed_copy(model, adapter, shape, alive_mlp, alive_heads)
    tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
    loss = sum(next_token_loss(twin(input_ids=i, attention_mask=m).logits, i, m)
               for i, m in batches) / tokens
    layers = adapter.decoder_layers(twin)
    weights = [[*adapter.mlp_inputs(l), adapter.mlp_output(l), *adapter.attn_qkv(l),
                adapter.attn_output(l)] for l in layers]
    grads = torch.autograd.grad(loss, [w.weight for ws in weights for w in ws])
    grad = dict(zip([id(w.weight) for ws in weights for w in ws], grads))
    t = lambda lin: (lin.weight * grad[id(lin.weight)]).abs()  # noqa: E731
    mlp = torch.zeros(shape.num_layers, shape.intermediate)
    heads = torch.zeros(shape.num_layers, shape.heads)
    hd = shape.head_dim
    for i, layer in enumerate(layers):
        for c in range(shape.intermediate):
            total = sum(t(w)[c].sum() for w in adapter.mlp_inputs(layer))
            mlp[i, c] = (total + t(adapter.mlp_output(layer))[:, c].sum()) / shape.params_per_channel
        q, k, v = adapter.attn_qkv(layer)
        for h in range(shape.heads):
            rows = slice(h * hd, (h + 1) * hd)
            total = t(q)[rows].sum() + t(adapter.attn_output(layer))[:, rows].sum()
            size = shape.q_params_per_head
            if shape.group_size == 1:
                total = total + t(k)[rows].sum() + t(v)[rows].sum()
                size += shape.kv_params_per_group
            heads[i, h] = total / size
    return mlp, heads, float(loss.detach())


@pytest.mark.parametrize("kv_heads", [2, 4])          # GQA and MHA
def test_taylor_scores_equal_brute_force(family, kv_heads):
    model = tiny_model(family, seed=2, num_key_value_heads=kv_heads)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    batches = _batches()
    alive_mlp, alive_heads = _masks(shape)
    mlp, heads, loss = masked_scores(model, adapter, shape, alive_mlp, alive_heads, [batches])
    ref_mlp, ref_heads, ref_loss = _brute_scores(model, adapter, shape, batches, alive_mlp,
                                                 alive_heads)
    assert torch.allclose(mlp, ref_mlp, rtol=1e-4, atol=1e-10)
    assert torch.allclose(heads, ref_heads, rtol=1e-4, atol=1e-10)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert (mlp[~alive_mlp] == 0).all() and (heads[~alive_heads] == 0).all()
    assert all(p.grad is None for p in model.parameters())            # nothing left behind


def test_channel_score_equals_finite_differences():
    """Channel 7 of layer 1: |W * dL/dW| over its gate and up rows and down column, each
    derivative of the mean next-token loss taken by central differences (float64 weights;
    the norms compute in float32, so steps of 1e-2 keep the rounding noise small)."""
    model = tiny_model("llama", seed=5, hidden_size=16, intermediate_size=24).double()
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    batches = _batches(seed=3, n=1, length=12)
    ids, mask = batches[0]
    alive = (torch.ones(shape.num_layers, shape.intermediate, dtype=torch.bool),
             torch.ones(shape.num_layers, shape.heads, dtype=torch.bool))
    mlp, _, _ = masked_scores(model, adapter, shape, *alive, [batches])

    def loss() -> float:
        with torch.no_grad():
            return float(next_token_loss(model(input_ids=ids).logits, ids, mask)) / int(mask[:, 1:].sum())

    layer = adapter.decoder_layers(model)[1]
    cells = [(lin.weight, (7, j)) for lin in adapter.mlp_inputs(layer) for j in range(shape.hidden)]
    cells += [(adapter.mlp_output(layer).weight, (i, 7)) for i in range(shape.hidden)]
    total = 0.0
    for weight, cell in cells:
        w = float(weight[cell])
        values = []
        for delta in (1e-2, -1e-2):
            with torch.no_grad():
                weight[cell] = w + delta
            values.append(loss())
        with torch.no_grad():
            weight[cell] = w
        total += abs(w * (values[0] - values[1]) / 2e-2)
    assert float(mlp[1, 7]) == pytest.approx(total / shape.params_per_channel, rel=1e-3)


def _real_trajectory(family="qwen2", kv_heads=2, steps=3, end=0.5, prune_attention=True):
    # MLPs wide enough that one head slice (4096 parameters) is under 1% of the budget
    model = tiny_model(family, seed=4, num_key_value_heads=kv_heads, intermediate_size=768)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    settings = GispSettings(steps=steps, end=end, protect_first=0.0, protect_last=1,
                            prune_attention=prune_attention)
    batches = [_batches(seed=7), _batches(seed=8)]
    table, history = trajectory(shape, settings, lambda m, h: masked_scores(
        model, adapter, shape, m, h, batches))
    return shape, table, history


def _scores_table(shape):
    units = random_units(shape, sources=2, seed=4)
    scores, _ = score_units(units, partition_units(units, 1, "wanda_sp"), "wanda_sp", "wanda_sp")
    return scores


def _plan(shape, table, sparsity):
    inputs = AllocationInputs(_scores_table(shape), shape, sparsity, True, {}, path_table=table)
    fractions, _ = GispAllocator.fractions(inputs)
    alloc = GispAllocator.allocation(fractions, inputs)
    layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]),
                             tuple(l["kv_keep"]))
                   for l in harden(GispAllocator.ranked(inputs.scores, inputs), alloc, shape))
    return PruningPlan("fp", "qwen2", "gisp", sparsity, shape, layers)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_trajectory_is_nested_and_every_target_meets_the_budget(kv_heads):
    shape, table, history = _real_trajectory(kv_heads=kv_heads)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[-1]["pruned"] >= 0.5 - 1e-9 and history[0]["pruned"] >= 0.5 / 3 - 1e-9
    freed = removal_params(table, shape)
    assert float(freed.sum()) / float(history[-1]["pruned"]) == pytest.approx(
        prunable_params(shape))
    assert (table[table.layer == shape.num_layers - 1].position == NEVER).all()   # protected
    kept_sets, heads_removed = [], False
    for sparsity in (0.1, 0.2, 0.3, 0.4, 0.5):
        plan = _plan(shape, table, sparsity)
        plan.check()
        assert abs(plan.achieved_sparsity - sparsity) <= 0.005
        expected = kept_at(table, shape, sparsity)
        kept = {("mlp", l.layer, u) for l in plan.layers for u in l.mlp_keep}
        kept |= {("attn", l.layer, h) for l in plan.layers for h in l.heads_keep}
        assert kept == {(r.kind, r.layer, r.unit) for r in expected[expected.kept].itertuples()}
        for l in plan.layers:
            assert len(l.mlp_keep) >= 0.1 * shape.intermediate
        heads_removed |= any(len(l.heads_keep) < shape.heads for l in plan.layers)
        kept_sets.append(kept)
    assert all(later <= earlier for earlier, later in zip(kept_sets, kept_sets[1:]))
    assert kept_sets[0] != kept_sets[-1] and heads_removed


def test_coarse_structures_still_meet_the_budget():
    """The default tiny model: a head slice is 4% of the budget, so no prefix of the
    trajectory is within 0.5 pp of every target; MLP channels fill the rest."""
    model = tiny_model("llama", seed=4)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    table, _ = trajectory(shape, GispSettings(steps=2, end=0.5, protect_first=0.0),
                          lambda m, h: masked_scores(model, adapter, shape, m, h, [_batches()]))
    for sparsity in (0.15, 0.25, 0.4, 0.5):
        plan = _plan(shape, table, sparsity)
        plan.check()
        assert abs(plan.achieved_sparsity - sparsity) <= 0.005


def test_one_step_equals_one_shot_global_pruning():
    """T=1: the removal order is the dense scores' global ascending order (MHA: each
    head a structure), skipping channels of a layer at its floor."""
    model = tiny_model("llama", seed=6, num_key_value_heads=4)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    gen = torch.Generator().manual_seed(0)
    mlp = torch.rand(shape.num_layers, shape.intermediate, generator=gen)
    heads = torch.rand(shape.num_layers, shape.heads, generator=gen) * 0.5
    settings = GispSettings(steps=1, end=0.45, protect_first=0.0, protect_last=1)
    table, _ = trajectory(shape, settings, lambda m, h: (mlp, heads, 0.0))
    candidates = sorted([(float(mlp[l, u]), "mlp", l, u) for l in range(2)
                         for u in range(shape.intermediate)]
                        + [(float(heads[l, h]), "attn", l, h) for l in range(2)
                           for h in range(shape.heads)])
    goal = 0.45 * prunable_params(shape)
    removed, freed, left = [], 0, {0: shape.intermediate, 1: shape.intermediate}
    for _, kind, layer, unit in candidates:
        if freed >= goal:
            break
        if kind == "mlp":
            if left[layer] <= 10:                 # ceil(0.1 * 96)
                continue
            left[layer] -= 1
            freed += shape.params_per_channel
        else:
            freed += shape.q_params_per_head + shape.kv_params_per_group
        removed.append((kind, layer, unit))
    order = table[table.position < NEVER].sort_values("position")
    assert list(zip(order.kind, order.layer, order.unit)) == removed


def test_margin_objective_gradient_on_a_two_choice_example():
    """Two answers whose losses are l_a = (t - 1)^2 and l_b = 3 t: the margin (correct a)
    is l_a - l_b, so d/dt = 2 (t - 1) - 3; with b correct it is 3 - 2 (t - 1)."""
    t = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    losses = lambda: torch.stack([(t - 1) ** 2, 3 * t])[None]           # noqa: E731 (1, 2)
    (grad_a,) = torch.autograd.grad(margin_loss(losses(), torch.tensor([0])), [t])
    (grad_b,) = torch.autograd.grad(margin_loss(losses(), torch.tensor([1])), [t])
    assert float(grad_a) == pytest.approx(2 * (0.25 - 1) - 3)
    assert float(grad_b) == pytest.approx(3 - 2 * (0.25 - 1))


def test_bad_settings_fail_before_any_work():
    shape = adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config)
    called = []
    score = lambda m, h: called.append(1)  # noqa: E731
    with pytest.raises(ValueError, match="cover all 3 layers"):
        trajectory(shape, GispSettings(protect_first=0.7, protect_last=1), score)
    with pytest.raises(ValueError, match="beyond what the protected layers"):
        trajectory(shape, GispSettings(end=0.9), score)
    with pytest.raises(ValueError, match="at least one step"):
        check_settings(shape, GispSettings(steps=0))
    assert not called
    with pytest.raises(ConfigError, match="steps"):
        build_method("gisp:steps=0")
    table = pd.DataFrame({"kind": ["mlp"], "layer": [0], "unit": [0], "position": [0], "step": [1]})
    with pytest.raises(ValueError, match="beyond the GISP trajectory"):
        kept_at(table, shape, 0.3)


def test_margin_scores_are_the_margin_gradient_and_need_a_training_split(tmp_path):
    from gprune.maths.gisp_taylor import margin_items
    from gprune.models.tiny import byte_tokenizer

    model = tiny_model("llama", seed=9)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    rows = [{"query": "2+2=", "choices": ["4", "five"], "gold": 0},
            {"query": "sky is", "choices": ["green", "blue", "red"], "gold": 1}]
    items = margin_items(byte_tokenizer(), rows, pad_id=258)
    assert [int(i.answer.sum()) for i in items] == [2 + 5, 6 + 5 + 4]   # bytes of " " + choice
    alive = (torch.ones(shape.num_layers, shape.intermediate, dtype=torch.bool),
             torch.ones(shape.num_layers, shape.heads, dtype=torch.bool))
    mlp, _, margin = masked_scores(model, adapter, shape, *alive, [items], objective="margin")
    down = adapter.mlp_output(adapter.decoder_layers(model)[0]).weight
    total = 0.0
    for item in items:                       # the mean margin, built by hand
        losses = [next_token_loss(model(input_ids=item.ids[c:c + 1]).logits, item.ids[c:c + 1],
                                  item.answer[c:c + 1]) for c in range(len(item.ids))]
        wrong = [l for c, l in enumerate(losses) if c != item.gold]
        total = total + (losses[item.gold] - sum(wrong) / len(wrong)) / len(items)
    layer = adapter.decoder_layers(model)[0]
    weights = [w.weight for w in adapter.mlp_inputs(layer)] + [down]
    grads = torch.autograd.grad(total, weights)
    channel = sum(float((w[5] * g[5]).abs().sum().detach()) for w, g in zip(weights[:-1], grads[:-1]))
    channel += float((down[:, 5] * grads[-1][:, 5]).abs().sum().detach())
    assert margin == pytest.approx(float(total), rel=1e-5)
    assert float(mlp[0, 5]) == pytest.approx(channel / shape.params_per_channel, rel=1e-4)
    lone = tmp_path / "quiz.jsonl"
    lone.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(ConfigError, match="no training split"):
        build_method(f"gisp:objective=margin,task={lone}")
    with pytest.raises(ConfigError, match="needs task"):
        build_method("gisp:objective=margin")
    lone.with_suffix(".train.jsonl").write_text(lone.read_text())
    before = build_method(f"gisp:objective=margin,task={lone}").allocator_params()
    assert before["task"] == str(lone)
    lone.with_suffix(".train.jsonl").write_text('{"query": "q", "choices": ["a", "c"], "gold": 1}\n')
    after = build_method(f"gisp:objective=margin,task={lone}").allocator_params()
    assert after["task_digest"] != before["task_digest"]            # an edited split re-keys


def test_preflight_refuses_impossible_gisp_settings():
    from gprune.configs.pipeline import PipelineConfig, preflight

    def run(method, sparsity=0.3, **more):
        preflight(PipelineConfig.build(model="tiny:llama", methods=[method],
                                       sparsities=[sparsity], **more))

    run("gisp")                                                    # fine
    with pytest.raises(ConfigError, match="cover all 3 layers"):
        run("gisp:protect_first=0.7")
    with pytest.raises(ConfigError, match="beyond the trajectory, which ends at 0.60"):
        run("gisp", 0.65)
    run("gisp:heads=false", 0.35)                                  # MLP only: ends at 0.35
    with pytest.raises(ConfigError, match="ends at 0.35"):
        run("gisp:heads=false", 0.4)
    margin = "gisp:objective=margin,task=siqa_local"
    run(margin, mc_tasks=["siqa_local"], mc_limit=300)
    with pytest.raises(ConfigError, match="training split holds; use at most 1218"):
        run(margin, mc_tasks=["siqa_local"], mc_limit=1500)


def test_half_precision_gradients_are_summed_in_float32():
    """A bfloat16 model: scores close to the float32 model's (gradients in the model's
    dtype, summed over batches in float32), and no float32 buffer left behind."""
    model = tiny_model("llama", seed=2)
    adapter = adapter_for(model.config)
    shape = adapter.shape(model.config)
    alive = _masks(shape)
    ref, _, _ = masked_scores(model, adapter, shape, *alive, [_batches(n=3)])
    half, _, _ = masked_scores(model.to(torch.bfloat16), adapter, shape, *alive, [_batches(n=3)])
    assert half.dtype == torch.float32
    assert torch.corrcoef(torch.stack([ref.flatten(), half.flatten()]))[0, 1] > 0.95
    assert not any(hasattr(p, "grad32") or p.grad is not None for p in model.parameters())
