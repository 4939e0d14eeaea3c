"""Parameter budgets and GQA-feasible head selection.

Sparsity S is the fraction of prunable parameters removed (METHOD.md): MLP
projections plus attention q/k/v/o. One MLP channel costs ``params_per_channel``;
one query head costs its q rows and o columns; one KV group costs its k and v
rows and goes only when none of its query heads is kept.
"""
from __future__ import annotations

import math

import numpy as np

from gprune.errors import ConfigError
from gprune.maths.plan import prunable_params
from gprune.models.adapters import ModelShape


def feasible_head_counts(shape: ModelShape) -> list[tuple[int, int]]:
    """(kept groups g, heads per kept group r) pairs; g * r heads in all, (0, 0) = no attention."""
    pairs = [(0, 0)]
    pairs += [(g, r) for g in range(1, shape.kv_heads + 1) for r in range(1, shape.group_size + 1)]
    return pairs


def head_config_for(shape: ModelShape, n_heads: float) -> tuple[int, int]:
    """The feasible (g, r) whose head count is closest to ``n_heads`` (more groups on ties)."""
    return min(feasible_head_counts(shape),
               key=lambda gr: (abs(gr[0] * gr[1] - n_heads), -gr[0] * gr[1], -gr[0]))


def select_heads(head_scores: np.ndarray, group_size: int, groups: int,
                 per_group: int) -> tuple[list[int], list[int]]:
    """Keep ``per_group`` best heads in each of the ``groups`` best KV groups.

    head_scores: (heads,), higher = more important; heads of group j are
    j*group_size .. (j+1)*group_size-1 (HF repeat_kv layout).
    Returns (sorted kept query heads, sorted kept KV groups).
    """
    if groups == 0 or per_group == 0:
        return [], []
    by_group = head_scores.reshape(-1, group_size)                  # (kv_heads, group_size)
    order = np.argsort(-by_group, axis=1, kind="stable")[:, :per_group]
    group_value = np.take_along_axis(by_group, order, axis=1).sum(axis=1)
    kept_groups = sorted(np.argsort(-group_value, kind="stable")[:groups].tolist())
    heads = sorted(int(g * group_size + h) for g in kept_groups for h in order[g])
    return heads, kept_groups


def mlp_floor(n_channels: int, floor_fraction: float) -> int:
    return max(1, math.ceil(floor_fraction * n_channels))


def max_sparsity(shape: ModelShape, floor_fraction: float, prune_attention: bool) -> float:
    """The largest sparsity the floors allow."""
    min_layer = shape.layer_params(mlp_floor(shape.intermediate, floor_fraction),
                                   0 if prune_attention else shape.heads,
                                   0 if prune_attention else shape.kv_heads)
    return 1.0 - min_layer * shape.num_layers / prunable_params(shape)


def check_target(shape: ModelShape, sparsity: float, floor_fraction: float,
                 prune_attention: bool) -> None:
    limit = max_sparsity(shape, floor_fraction, prune_attention)
    if sparsity > limit:
        raise ConfigError(f"sparsity {sparsity:.3f} is impossible: the floors (keep "
                          f">= {floor_fraction:.0%} of each layer's MLP channels"
                          f"{'' if prune_attention else ', all heads'}) allow at most {limit:.3f}")
