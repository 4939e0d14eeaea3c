"""The first-order refinement of MLP counts (gprune.maths.refine): the wide copy computes
the narrow plan's model, each layer's gain is the directional derivative of the KL (brute
force: central differences of the float64 KL), and the counts move against the standardized gains."""
from __future__ import annotations

import pytest
import torch

from gprune.maths.allocate import Allocation, Fractions
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.plan_check import dense_terms, pruned_copies, pruned_copy
from gprune.maths.refine import layer_gains, narrow_outputs, refined_fractions, widened
from gprune.maths.surgery import lsq_fits, set_output
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.synthetic import no_hooks, synthetic_grams
from tests.test_plan_check import batches


def plans(shape, family, counts, extra, seed=0):
    """(plan, wide plan): per layer the first ``counts[l]`` (then ``+ extra``) channels of a
    random order; every head kept."""
    gen = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(shape.intermediate, generator=gen).tolist()
              for _ in range(shape.num_layers)]
    alloc = Allocation({(l, 0): c for l, c in enumerate(counts)},
                       {l: (shape.kv_heads, shape.group_size) for l in range(shape.num_layers)})
    wide = widened(alloc, {(l, 0): shape.intermediate for l in range(shape.num_layers)}, extra)

    def plan_of(a):
        layers = tuple(LayerPlan.from_heads(l, orders[l][:a.mlp_counts[(l, 0)]],
                                            range(shape.heads), shape)
                       for l in range(shape.num_layers))
        return PruningPlan(model_fingerprint="x", family=family, method="t",
                           target_sparsity=0.3, dense=shape, layers=layers, reconstruct="lsq")
    return plan_of(alloc), plan_of(wide)


def setup(family, dtype=torch.float32):
    dense = tiny_model(family).to(dtype)
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    counts = [shape.intermediate // 2 + l for l in range(shape.num_layers)]
    counts[-1] = shape.intermediate - 1          # its wide copy keeps every channel (dense)
    plan, wide_plan = plans(shape, family, counts, extra=3)
    fits = lsq_fits(synthetic_grams(shape), 1e-3, [])
    wide = pruned_copies(dense, adapter, [wide_plan], fits)[0]
    steps = narrow_outputs(wide, dense, adapter, plan, wide_plan, fits)
    return dense, adapter, plan, wide_plan, fits, wide, steps


def logits(model, data):
    with torch.no_grad():
        return [model(input_ids=ids, attention_mask=mask).logits for ids, mask in data]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "starcoder2"])
def test_the_wide_copy_computes_the_narrow_plan_and_its_steps_the_wide_one(family):
    dense, adapter, plan, wide_plan, fits, wide, steps = setup(family)
    for got, want in zip(logits(wide, batches()),
                         logits(pruned_copy(dense, adapter, plan, fits), batches())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert steps[-1].weight.abs().sum() > 0      # the dense layer moves as well
    for layer, step in zip(adapter.decoder_layers(wide), steps):
        out = adapter.mlp_output(layer)
        set_output(out, out.weight + step.weight, out.bias + step.bias)
    for got, want in zip(logits(wide, batches()),
                         logits(pruned_copy(dense, adapter, wide_plan, fits), batches())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def summed_kl(model, dense, data) -> float:
    """KL(dense || model) summed over the predicted tokens, in float64."""
    total = 0.0
    with torch.no_grad():
        for ids, mask in data:
            p = torch.log_softmax(dense(input_ids=ids, attention_mask=mask).logits.double(), -1)
            q = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
            kl = (p.exp() * (p - q)).sum(-1)[:, :-1]                          # (B, T-1)
            total += float((kl * mask[:, 1:]).sum())
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_gains_are_the_directional_derivatives_of_the_kl(family):
    dense, adapter, _, _, _, wide, steps = setup(family, torch.float64)
    data = batches()

    def terms(number, ids, mask):
        with torch.no_grad():
            return dense_terms(dense(input_ids=ids, attention_mask=mask).logits)

    gains = layer_gains(wide, adapter, steps, data, terms)
    assert no_hooks(wide)
    eps = 1e-3          # HF norms and rotary run in float32: smaller steps drown in rounding
    for index, (layer, step) in enumerate(zip(adapter.decoder_layers(wide), steps)):
        out = adapter.mlp_output(layer)
        weight, bias = out.weight.detach().clone(), out.bias.detach().clone()
        moved = []
        for sign in (1, -1):
            set_output(out, weight + sign * eps * step.weight, bias + sign * eps * step.bias)
            moved.append(summed_kl(wide, dense, data))
        set_output(out, weight, bias)
        assert float(gains[index]) == pytest.approx((moved[0] - moved[1]) / (2 * eps),
                                                    rel=2e-2, abs=1e-6)
    assert gains.abs().max() > 0


def test_refined_counts_move_against_the_standardized_gains():
    alloc = Allocation({(0, 0): 10, (1, 0): 10, (2, 0): 10}, {})
    fractions = Fractions({m: 0.5 for m in alloc.mlp_counts}, {m: 20 for m in alloc.mlp_counts},
                          {0: 1.0, 1: 1.0, 2: 1.0})
    gains = torch.tensor([-3.0, 0.0, 3.0])       # layer 0: more channels lower the KL most
    refined = refined_fractions(alloc, fractions, gains, extra=4)
    assert refined.mlp == pytest.approx({(0, 0): (10 + 4) / 20, (1, 0): 0.5,
                                         (2, 0): (10 - 4) / 20})
    assert refined.attn == fractions.attn and refined.mlp_sizes == fractions.mlp_sizes
    flat = refined_fractions(alloc, fractions, torch.zeros(3), extra=4)
    assert flat.mlp == pytest.approx(fractions.mlp)


def test_grid_corrections_apply_exactly_at_grid_points_and_linearly_between():
    import pandas as pd

    from gprune.maths.refine import corrected, corrections

    sizes = {(0, 0): 10, (1, 0): 10}
    base = Fractions({(0, 0): 0.5, (1, 0): 0.5}, sizes, {0: 1.0, 1: 1.0})
    table = pd.concat([corrections(base, Fractions({(0, 0): f0, (1, 0): f1}, sizes, {}), s)
                       for s, f0, f1 in [(0.2, 0.6, 0.5), (0.4, 0.3, 0.9)]])
    assert corrected(base, table, 0.2).mlp == pytest.approx({(0, 0): 0.6, (1, 0): 0.5})
    assert corrected(base, table, 0.4).mlp == pytest.approx({(0, 0): 0.3, (1, 0): 0.9})
    assert corrected(base, table, 0.3).mlp == pytest.approx({(0, 0): 0.45, (1, 0): 0.7})
    assert corrected(base, table, 0.1).mlp == pytest.approx({(0, 0): 0.6, (1, 0): 0.5})
    assert corrected(base, table, 0.7).mlp == pytest.approx({(0, 0): 0.3, (1, 0): 0.9})
    shifted = Fractions({(0, 0): 0.95, (1, 0): 0.0}, sizes, {})   # clipped to [0, 1]
    assert corrected(shifted, table, 0.4).mlp == pytest.approx({(0, 0): 0.75, (1, 0): 0.4})
