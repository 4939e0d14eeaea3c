"""Stage 5 (non-learned parts): keep counts per module, exact budget projection, hardening.

An allocation says how many units each module keeps: MLP channels per
(layer, module) and a GQA-feasible (groups, heads per group) per layer. Every
allocator (uniform, FLAP's global threshold, learned) produces continuous keep
fractions; ``project`` turns them into integer counts that meet the global
parameter budget, and ``harden`` picks the best-scored units of each module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gprune.maths.budget import (feasible_head_counts, head_config_for, mlp_floor, prunable_params,
                                 select_heads)
from gprune.models.adapters import ModelShape

ModuleId = tuple[int, int]   # (layer, module)


@dataclass
class Allocation:
    mlp_counts: dict[ModuleId, int]          # kept channels per MLP module
    head_configs: dict[int, tuple[int, int]]  # layer -> (kept KV groups, heads per group)

    def kept_params(self, shape: ModelShape) -> int:
        channels = sum(self.mlp_counts.values())
        heads = sum(g * r for g, r in self.head_configs.values())
        groups = sum(g for g, _ in self.head_configs.values())
        return shape.layer_params(channels, heads, groups)


@dataclass
class Fractions:
    """Continuous keep fractions: per MLP module and per layer's attention."""

    mlp: dict[ModuleId, float]
    mlp_sizes: dict[ModuleId, int]
    attn: dict[int, float]
    floors: dict[ModuleId, float] = field(default_factory=dict)  # per-module keep floors

    def floor_of(self, module: ModuleId, floor: float) -> int:
        """The fewest channels ``module`` keeps: the global floor or its own, the larger."""
        return mlp_floor(self.mlp_sizes[module], max(floor, self.floors.get(module, 0.0)))


def module_sizes(scores: pd.DataFrame) -> dict[ModuleId, int]:
    mlp = scores[scores.kind == "mlp"]
    return {(int(l), int(m)): int(n) for (l, m), n in mlp.groupby(["layer", "module"]).size().items()}


def uniform_fractions(scores: pd.DataFrame, shape: ModelShape, sparsity: float,
                      prune_attention: bool) -> Fractions:
    sizes = module_sizes(scores)
    attn = {layer: (1.0 - sparsity) if prune_attention else 1.0 for layer in range(shape.num_layers)}
    return Fractions({m: 1.0 - sparsity for m in sizes}, sizes, attn)


def _mlp_counts(fr: Fractions, shift: float, floor: float) -> dict[ModuleId, int]:
    counts = {}
    for module, size in fr.mlp_sizes.items():
        want = math.ceil(min(max(fr.mlp[module] + shift, 0.0), 1.0) * size - 1e-9)
        counts[module] = min(size, max(want, fr.floor_of(module, floor)))
    return counts


def _head_configs(fr: Fractions, shift: float, shape: ModelShape,
                  prune_attention: bool) -> dict[int, tuple[int, int]]:
    if not prune_attention:
        return {layer: (shape.kv_heads, shape.group_size) for layer in fr.attn}
    return {layer: head_config_for(shape, min(max(frac + shift, 0.0), 1.0) * shape.heads)
            for layer, frac in fr.attn.items()}


def _largest_shift(kept_at, target: float) -> float:
    """Largest shift in [-1, 1] whose kept parameter count stays within ``target``."""
    low, high = -1.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if kept_at(mid) <= target else (low, mid)
    return low


def project(fr: Fractions, shape: ModelShape, sparsity: float, floor: float,
            prune_attention: bool) -> Allocation:
    """Integer counts meeting the budget.

    One scalar shift of every fraction sets the head configurations; with those
    fixed a second shift (then single channels) fills the rest with MLP channels.
    When the MLP is full and the budget is still not met, heads come back one
    feasible step at a time in the layers whose fractions wanted them most.
    """
    target = (1.0 - sparsity) * prunable_params(shape)
    both = lambda d: Allocation(_mlp_counts(fr, d, floor),  # noqa: E731
                                _head_configs(fr, d, shape, prune_attention)).kept_params(shape)
    heads = _head_configs(fr, _largest_shift(both, target), shape, prune_attention)
    while True:
        mlp_only = lambda d: Allocation(_mlp_counts(fr, d, floor), heads).kept_params(shape)  # noqa: E731
        shift = _largest_shift(mlp_only, target)
        alloc = Allocation(_mlp_counts(fr, shift, floor), heads)
        _fill_channels(alloc, fr, shift, shape, target)
        if target - alloc.kept_params(shape) < shape.params_per_channel:
            return alloc
        if not _step_up_heads(alloc, fr, shape, target, floor):
            return alloc
        heads = alloc.head_configs


def _step_up_heads(alloc: Allocation, fr: Fractions, shape: ModelShape, target: float,
                   floor: float) -> bool:
    """Give one layer its next larger head configuration if the floors still fit the budget."""
    floors = Allocation({m: fr.floor_of(m, floor) for m in fr.mlp_sizes}, {})
    by_want = sorted(fr.attn, key=lambda l: -(fr.attn[l] * shape.heads - _heads(alloc, l)))
    for layer in by_want:
        bigger = [gr for gr in feasible_head_counts(shape) if gr[0] * gr[1] > _heads(alloc, layer)]
        if not bigger:
            continue
        trial = dict(alloc.head_configs)
        trial[layer] = min(bigger, key=lambda gr: (gr[0] * gr[1], -gr[0]))
        if Allocation(floors.mlp_counts, trial).kept_params(shape) <= target:
            alloc.head_configs = trial
            return True
    return False


def _fill_channels(alloc: Allocation, fr: Fractions, shift: float, shape: ModelShape,
                   target: float) -> None:
    """Add single channels where the fractions wanted most, until one more would overshoot."""
    missing = int((target - alloc.kept_params(shape)) // shape.params_per_channel)
    open_modules = sorted((m for m in fr.mlp_sizes if alloc.mlp_counts[m] < fr.mlp_sizes[m]),
                          key=lambda m: -((fr.mlp[m] + shift) * fr.mlp_sizes[m] - alloc.mlp_counts[m]))
    while missing > 0 and open_modules:
        for module in list(open_modules):
            if missing == 0:
                break
            alloc.mlp_counts[module] += 1
            missing -= 1
            if alloc.mlp_counts[module] == fr.mlp_sizes[module]:
                open_modules.remove(module)


def _heads(alloc: Allocation, layer: int) -> int:
    groups, per_group = alloc.head_configs[layer]
    return groups * per_group


def top_units(module: pd.DataFrame, count: int) -> list[int]:
    """The ``count`` best-scored units of one module (ties: the lower unit index first)."""
    return module.sort_values(["score", "unit"], ascending=[False, True]).unit[:count].tolist()


def harden(scores: pd.DataFrame, alloc: Allocation, shape: ModelShape) -> list[dict]:
    """Per layer: the kept MLP channels (top count per module) and the kept heads / KV groups."""
    layers = []
    for layer in range(shape.num_layers):
        mlp = scores[(scores.layer == layer) & (scores.kind == "mlp")]
        keep: list[int] = []
        for module, group in mlp.groupby("module"):
            count = alloc.mlp_counts[(layer, int(module))]
            keep += top_units(group, count)
        attn = scores[(scores.layer == layer) & (scores.kind == "attn")].sort_values("unit")
        groups, per_group = alloc.head_configs[layer]
        heads, kv = select_heads(attn.raw.to_numpy(dtype=float), shape.group_size, groups, per_group)
        layers.append({"layer": layer, "mlp_keep": sorted(int(u) for u in keep),
                       "heads_keep": heads, "kv_keep": kv})
    return layers


def flap_fractions(scores: pd.DataFrame, shape: ModelShape, sparsity: float,
                   prune_attention: bool) -> Fractions:
    """FLAP's joint threshold (reference ``lib/prune.py``, structure AL-AM).

    Standardized scores of MLP channels and heads in one ranking (``flap_z``), each
    unit weighing the parameters it removes (a head: its q/o plus its share of k/v,
    4 * hidden * head_dim for MHA: FLAP's 512/3 channels at head_dim 128); the units
    above the threshold fill the budget.
    """
    z = flap_z(scores)
    is_head = (scores.kind == "attn").to_numpy()
    weight = np.where(is_head, shape.head_params_amortized, shape.params_per_channel)
    if not prune_attention:
        z = np.where(is_head, np.inf, z)
    target = (1.0 - sparsity) * prunable_params(shape)
    order = np.argsort(-z, kind="stable")
    cumulative = np.cumsum(weight[order])
    kept = np.zeros(len(z), dtype=bool)
    kept[order[: int(np.searchsorted(cumulative, target, side="right"))]] = True
    table = scores.assign(kept=kept)
    sizes = module_sizes(scores)
    mlp = table[table.kind == "mlp"].groupby(["layer", "module"]).kept.mean()
    attn = table[table.kind == "attn"].groupby("layer").kept.mean()
    return Fractions({(int(l), int(m)): float(v) for (l, m), v in mlp.items()}, sizes,
                     {int(l): float(v) for l, v in attn.items()})


def _standardized(values: pd.Series) -> pd.Series:
    """(v - mean) / std with ddof=1 (torch.std's default, as FLAP); 0 where std is 0 or NaN."""
    std = values.std(ddof=1)
    return (values - values.mean()) / std if std > 0 else values * 0.0


def flap_z(scores: pd.DataFrame) -> np.ndarray:
    """(units,) the standardized scores FLAP's threshold compares.

    MLP channels: raw standardized over the layer's channels. Heads: their ``z`` column,
    FLAP's rule over the layer's H * head_dim channels (``gprune.maths.stats``); heads
    without one (weight-scored, or no channel statistics) fall back to raw standardized
    over the layer's heads.
    """
    by_block = scores.groupby(["layer", "kind"]).raw.transform(_standardized).to_numpy()
    z = (scores["z"].to_numpy(dtype=float) if "z" in scores
         else np.full(len(scores), np.nan))                                    # (units,)
    use_z = (scores.kind == "attn").to_numpy() & ~np.isnan(z)
    return np.where(use_z, z, by_block)
