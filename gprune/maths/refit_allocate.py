"""Allocation by measured reconstruction error: what a head or a channel costs after refit.

For every layer and kind (MLP channels, attention heads) the error that pruning leaves
after the least-squares refit (``gprune.maths.refit``) is computed in closed form from
the Gram for a ladder of keep counts: MLP channels at ``steps`` fractions between the
floor and 1 (the kept set at each count is the best-scored units of each module, as
``harden`` picks them), attention at every GQA-feasible head configuration (heads chosen
as ``select_heads`` would). Each output dimension's residual is weighted by the loss's
sensitivity to that dimension of that projection's output (the diagonal Fisher of
``gprune.maths.fisher``), so an error is priced in units of loss: layers and kinds
compare. A greedy descent then removes, one ladder step at a time, whatever costs the
least weighted error per parameter saved, until the budget is met; ``project`` makes
the counts exact. (Two earlier weightings, by the layer's whole output energy and by each
dimension's output energy, sent layers of SmolLM2 to the MLP floor and did worse than
the learned path: a projection's own output scale does not say what its error costs.)

Pure: weights, Grams, Fisher and scores come in as tensors/DataFrames; shapes in comments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from gprune.maths.allocate import Fractions, module_sizes, top_units
from gprune.maths.budget import feasible_head_counts, mlp_floor, select_heads
from gprune.maths.plan import prunable_params
from gprune.maths.refit import dense_map, lsq_refit, residual_per_output
from gprune.maths.surgery import head_channels
from gprune.models.adapters import ModelShape

Grams = Callable[[int, str], torch.Tensor]                 # (layer, kind) -> (d+1, d+1)
Maps = Callable[[int, str], tuple[torch.Tensor, torch.Tensor | None]]  # -> (W, b)
Weights = Callable[[int, str], torch.Tensor]              # (layer, kind) -> (hidden,) Fisher


@dataclass
class Ladder:
    """Keep options of one (layer, kind), most kept first: params kept and error left."""

    layer: int
    kind: str
    params: list[int]
    errors: list[float]
    keeps: list[float]          # the keep fraction each option stands for


def mlp_kept(scores: pd.DataFrame, layer: int, fraction: float, floor: float) -> torch.Tensor:
    """The best-scored channels of each module of ``layer`` at ``fraction``: (k,)."""
    mlp = scores[(scores.layer == layer) & (scores.kind == "mlp")]
    keep: list[int] = []
    for _module, group in mlp.groupby("module"):
        count = max(mlp_floor(len(group), floor), math.ceil(fraction * len(group) - 1e-9))
        keep += top_units(group, count)
    return torch.tensor(sorted(int(u) for u in keep), dtype=torch.long)


def error_after_refit(w: torch.Tensor, b: torch.Tensor | None, gram: torch.Tensor,
                      keep: torch.Tensor, ridge: float, weight: torch.Tensor) -> float:
    """The refit's error, each output dimension times ``weight`` (out,), summed."""
    if keep.numel() == 0:                                       # nothing kept, not even bias
        a = dense_map(w, b)                                     # (out, d+1)
        s = torch.tensor([a.shape[1] - 1], device=a.device)
        per_output = residual_per_output(a, gram.to(a), a[:, -1:], s)
    else:
        per_output = lsq_refit(w, b, gram, keep, ridge, condition=False).per_output
    return float((per_output * weight.to(per_output)).sum())


def mlp_ladder(scores, shape: ModelShape, layer: int, gram, w, b, ridge: float,
               floor: float, steps: int, weight: torch.Tensor) -> Ladder:
    top = [1.0 - i / steps for i in range(steps + 1)]
    fractions = sorted({max(f, floor) for f in top}, reverse=True)
    params, errors = [], []
    for f in fractions:
        keep = mlp_kept(scores, layer, f, floor)
        params.append(int(keep.numel()) * shape.params_per_channel)
        errors.append(error_after_refit(w, b, gram, keep, ridge, weight))
    return Ladder(layer, "mlp", params, errors, fractions)


def attn_ladder(scores, shape: ModelShape, layer: int, gram, w, b, ridge: float,
                weight: torch.Tensor) -> Ladder:
    raw = scores[(scores.layer == layer) & (scores.kind == "attn")].sort_values("unit")
    head_scores = raw.raw.to_numpy(dtype=float)                          # (heads,)
    configs = sorted(feasible_head_counts(shape), key=lambda gr: (-gr[0] * gr[1], -gr[0]))
    params, errors, keeps, seen = [], [], [], set()
    for groups, per_group in configs:
        if groups * per_group in seen:                         # one option per head count
            continue
        seen.add(groups * per_group)
        heads, _ = select_heads(head_scores, shape.group_size, groups, per_group)
        keep = head_channels(heads, shape.head_dim)
        params.append(shape.layer_params(0, groups * per_group, groups))
        errors.append(error_after_refit(w, b, gram, keep, ridge, weight))
        keeps.append(groups * per_group / shape.heads)
    return Ladder(layer, "attn", params, errors, keeps)


def greedy_descent(ladders: list[Ladder], target: float) -> list[int]:
    """Index of the chosen option of every ladder: cheapest (scaled) error per parameter
    saved first, until the kept parameters are within ``target``."""
    at = [0] * len(ladders)
    kept = sum(l.params[0] for l in ladders)
    while kept > target:
        best, best_cost = None, math.inf
        for i, ladder in enumerate(ladders):
            if at[i] + 1 >= len(ladder.params):
                continue
            saved = ladder.params[at[i]] - ladder.params[at[i] + 1]
            extra = ladder.errors[at[i] + 1] - ladder.errors[at[i]]
            cost = max(extra, 0.0) / max(saved, 1)
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        kept -= ladders[best].params[at[best]] - ladders[best].params[at[best] + 1]
        at[best] += 1
    return at


def refit_ladders(scores: pd.DataFrame, shape: ModelShape, prune_attention: bool,
                  grams: Grams, maps: Maps, weights: Weights, ridge: float,
                  floor: float = 0.1, steps: int = 16) -> pd.DataFrame:
    """Every ladder as a table (layer, kind, option, params, error, keep): it does not
    depend on the target, so one table serves every target sparsity."""
    rows = []
    for layer in range(shape.num_layers):
        m = {kind: maps(layer, kind) for kind in ("mlp", "attn")}
        # read once, moved once to the weights' device (every ladder option refits on it)
        g = {kind: grams(layer, kind).to(m[kind][0].device) for kind in ("mlp", "attn")}
        ladders = [mlp_ladder(scores, shape, layer, g["mlp"], *m["mlp"], ridge, floor, steps,
                              weights(layer, "mlp"))]
        if prune_attention:
            ladders.append(attn_ladder(scores, shape, layer, g["attn"], *m["attn"], ridge,
                                       weights(layer, "attn")))
        for ladder in ladders:
            rows += [{"layer": layer, "kind": ladder.kind, "option": i, "params": p,
                      "error": e, "keep": k}
                     for i, (p, e, k) in enumerate(zip(ladder.params, ladder.errors,
                                                        ladder.keeps))]
    return pd.DataFrame(rows)


def ladder_fractions(table: pd.DataFrame, scores: pd.DataFrame, shape: ModelShape,
                     sparsity: float) -> tuple[Fractions, list]:
    """Keep fractions at ``sparsity`` from a ladder table (``refit_ladders``) and the chosen
    (layer, kind, keep fraction, error) per ladder."""
    ladders = [Ladder(int(layer), str(kind), rows.params.astype(int).tolist(),
                      rows.error.tolist(), rows.keep.tolist())
               for (layer, kind), rows in table.sort_values("option").groupby(["layer", "kind"])]
    at = greedy_descent(ladders, (1.0 - sparsity) * prunable_params(shape))
    mlp = {l.layer: l.keeps[i] for l, i in zip(ladders, at) if l.kind == "mlp"}
    attn = {l.layer: l.keeps[i] for l, i in zip(ladders, at) if l.kind == "attn"}
    sizes = module_sizes(scores)
    fractions = Fractions({m: mlp[m[0]] for m in sizes}, sizes,
                          {layer: attn.get(layer, 1.0) for layer in range(shape.num_layers)})
    return fractions, [(l.layer, l.kind, l.keeps[i], l.errors[i]) for l, i in zip(ladders, at)]
