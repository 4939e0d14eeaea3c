"""Refine a plan's MLP keep counts by the refit model's calibration KL, to first order.

The learned path prices channels on a soft-masked model, before any refit; the allocate
stage then refits the kept columns by least squares. Moving each layer's count against
the finite-difference change of the *refit* model's KL when that layer gets more channels
improved held-out perplexity on SmolLM2 (docs/METHOD_NOTES.md), but finite differences
cost one whole-model measurement per layer. One backward pass estimates them all:

    layer l keeps S_l (refit output y_l = [x_S, 1] B_S^T); N_l: its next ``extra`` channels
    by score; y'_l = [x_{S+N}, 1] B_{S+N}^T is the refit output with N_l kept as well;
    KL(l keeps S_l + N_l) - KL  ~  sum_t <g_lt, y'_lt - y_lt>,   g_l = dKL / dy_l.

A copy of the dense model that keeps S + N everywhere, with S's refit columns and N's
columns zero, computes exactly the refit model's outputs and, at each MLP output
projection, the inputs x_{S+N} that y' needs; the gradient comes from one backward pass of
that copy on calibration batches. Each layer's count then moves by ``-extra * z_l`` (z_l its
standardized gain: a layer where more channels lower the KL most gains the most) and the
budget projection follows. Measured on SmolLM2, the estimate correlates 0.83 / 0.93 with
the finite differences (30% / 40%) at 1/50 of their cost.

``corrections`` / ``corrected``: the learned path's refinement done once per grid point
(the path stage) and applied, interpolated, at a target (the allocate stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from gprune.maths.allocate import Allocation, Fractions, ModuleId
from gprune.maths.plan import PruningPlan
from gprune.maths.plan_check import Batches, kl_sums
from gprune.maths.surgery import Fits, set_output
from gprune.models.adapters import FamilyAdapter


@dataclass(frozen=True)
class OutputStep:
    """What adding N_l changes at layer l's MLP output projection (inputs S + N)."""
    weight: torch.Tensor    # (out, |S+N|) W_{S+N} - [W_S, 0] in S + N's column order
    bias: torch.Tensor      # (out,)


def widened(alloc: Allocation, sizes: dict[ModuleId, int], extra: int) -> Allocation:
    """``alloc`` with ``extra`` more channels in every MLP module (at most its size)."""
    return Allocation({m: min(sizes[m], count + extra) for m, count in alloc.mlp_counts.items()},
                      dict(alloc.head_configs))


def narrow_outputs(wide: nn.Module, dense: nn.Module, adapter: FamilyAdapter,
                   plan: PruningPlan, wide_plan: PruningPlan, fits: Fits) -> list[OutputStep]:
    """Set each MLP output projection of ``wide`` (a refit copy of ``wide_plan``, which
    keeps a superset of ``plan``'s channels) to ``plan``'s output projection (its refit, or
    the dense weights where it removes nothing), the added columns zero, so ``wide``
    computes ``plan``'s model; return each layer's ``OutputStep``."""
    steps = []
    dense_layers = adapter.decoder_layers(dense)
    for index, layer in enumerate(adapter.decoder_layers(wide)):
        out, source = adapter.mlp_output(layer), adapter.mlp_output(dense_layers[index])
        device = out.weight.device
        narrow, kept = (torch.tensor(p.layers[index].mlp_keep, device=device)
                        for p in (plan, wide_plan))
        columns = torch.searchsorted(kept, narrow)
        if columns.max() >= len(kept) or not torch.equal(kept[columns], narrow):
            raise ValueError(f"layer {index}: the wide plan does not keep the plan's channels")
        weight, bias = (fits(index, "mlp")(source.weight, source.bias, narrow)
                        if narrow.numel() < source.in_features else (source.weight, source.bias))
        dtype = torch.promote_types(out.weight.dtype, torch.float32)
        padded = torch.zeros(out.weight.shape, dtype=dtype, device=device)   # (out, |S+N|)
        padded[:, columns] = weight.detach().to(device, dtype)
        bias = (torch.zeros(padded.shape[0], dtype=dtype, device=device) if bias is None
                else bias.detach().to(device, dtype))
        wide_bias = torch.zeros_like(bias) if out.bias is None else out.bias.detach().to(dtype)
        steps.append(OutputStep(out.weight.detach().to(dtype) - padded, wide_bias - bias))
        set_output(out, padded, bias)
    return steps


def layer_gains(wide: nn.Module, adapter: FamilyAdapter, steps: list[OutputStep],
                batches: Batches, teacher_terms, forward: nn.Module | None = None
                ) -> torch.Tensor:
    """(L,) first-order change of the summed KL(dense || model) over ``batches`` when layer
    l's output projection moves by ``steps[l]``. ``teacher_terms(number, ids, mask)``: the
    dense side's ``dense_terms`` of batch ``number``; ``forward``: what runs ``wide``
    (e.g. its ``gprune.maths.precision.Autocast``; default ``wide`` itself)."""
    device = next(wide.parameters()).device
    gains = torch.zeros(len(steps), dtype=torch.float64)
    wide.requires_grad_(False)

    def on_output(index: int):
        def hook(_module, args, output):
            inputs = args[0].detach()                                          # (B, T, |S+N|)
            step = steps[index]

            def accumulate(grad):                                              # (B, T, out)
                dtype = step.weight.dtype       # the product in the forward's precision
                g = grad.to(inputs.dtype).flatten(0, 1)                            # (B*T, out)
                x = inputs.flatten(0, 1)                                           # (B*T, |S+N|)
                moved = ((g.T @ x).to(dtype) * step.weight.to(device)).sum()
                g = g.to(dtype)
                gains[index] += float(moved + (g.sum(0) * step.bias.to(device)).sum())
            output.register_hook(accumulate)
        return hook

    layers = adapter.decoder_layers(wide)
    handles = [wide.get_input_embeddings().register_forward_hook(
        lambda _m, _a, output: output.requires_grad_())]
    handles += [adapter.mlp_output(layer).register_forward_hook(on_output(i))
                for i, layer in enumerate(layers)]
    try:
        for number, (input_ids, attention_mask) in enumerate(batches):
            ids, mask = input_ids.to(device), attention_mask.to(device)
            p, neg_entropy = teacher_terms(number, ids, mask)
            logits = (forward or wide)(input_ids=ids, attention_mask=mask).logits[:, :-1]
            kl_sums(logits, p, neg_entropy, mask[:, 1:].float()).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return gains


def refined_fractions(alloc: Allocation, fractions: Fractions, gains: torch.Tensor,
                      extra: int) -> Fractions:
    """Every layer's MLP count moved by ``-extra * z`` (z: the layer's standardized gain;
    one MLP module per layer), as fractions for the budget projection."""
    spread = gains.std()
    z = (gains - gains.mean()) / spread if spread > 0 else torch.zeros_like(gains)
    mlp = {(layer, module): min(1.0, max(0.0, (count - extra * float(z[layer]))
                                         / fractions.mlp_sizes[(layer, module)]))
           for (layer, module), count in alloc.mlp_counts.items()}
    return Fractions(mlp, dict(fractions.mlp_sizes), dict(fractions.attn),
                     dict(fractions.floors))


def corrections(base: Fractions, refined: Fractions, sparsity: float) -> pd.DataFrame:
    """One grid point's rows (sparsity, layer, module, correction = refined - base)."""
    return pd.DataFrame([{"sparsity": sparsity, "layer": layer, "module": module,
                          "correction": refined.mlp[(layer, module)] - f}
                         for (layer, module), f in base.mlp.items()])


def corrected(fractions: Fractions, table: pd.DataFrame, sparsity: float) -> Fractions:
    """``fractions`` plus the grid's corrections at ``sparsity``: linear between the two
    grid points around it, the nearest one's outside the grid (at a grid point exactly its
    own, so the target's plan is the one refined there)."""
    grid = np.sort(table.sparsity.unique())
    s = float(np.clip(sparsity, grid[0], grid[-1]))
    upper = int(np.searchsorted(grid, s - 1e-9))
    lower = max(upper - 1, 0) if not np.isclose(grid[upper], s) else upper
    span = grid[upper] - grid[lower]
    weight = 0.0 if span == 0 else (s - grid[lower]) / span
    def at(point):
        rows = table[np.isclose(table.sparsity, point)]
        return {(int(r.layer), int(r.module)): float(r.correction) for r in rows.itertuples()}
    low, high = at(grid[lower]), at(grid[upper])
    mlp = {m: min(1.0, max(0.0, float(f + (1 - weight) * low[m] + weight * high[m])))
           for m, f in fractions.mlp.items()}
    return Fractions(mlp, dict(fractions.mlp_sizes), dict(fractions.attn),
                     dict(fractions.floors))
