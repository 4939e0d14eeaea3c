"""Stage 5 (learned path): one learning run serves every target sparsity.

The per-target allocator (``learned.py``, METHOD.md stage 5) learns keep fractions
k(M) for one target S. A sweep over five targets then pays for five learning runs,
which dominates a sweep on a CPU. The path parameterizes the keep fraction of
module M as a function of the target:

    k_M(S) = sigmoid(a_M + b_M * z(S)),   z(S) = logit(1 - S)

initialized at a = 0, b = 1 (k_M(S) = 1 - S: uniform). Each step trains on one
target from a fixed grid (cycled), with the same objective as the per-target
allocator: KL(dense || soft-masked) + penalty * (budget(k(S)) - (1 - S))^2. The
learned (a, b) are independent of the targets a run asks for, so one path artifact
serves every target; ``path_fractions`` evaluates it at S and the usual exact
projection and hardening follow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from gprune.maths.allocate import Fractions
from gprune.maths.learned import (LearnSettings, build_layout, fractions_from_keep,
                                  optimize_keep)
from gprune.models.adapters import FamilyAdapter, ModelShape

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass
class PathSettings(LearnSettings):
    steps: int = 48
    grid: tuple[float, ...] = DEFAULT_GRID


def target_logit(sparsity: float) -> float:
    keep = min(max(1.0 - sparsity, 1e-4), 1 - 1e-4)
    return math.log(keep / (1.0 - keep))


def path_keep(a: torch.Tensor, b: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep fractions (M,) of every module at target ``sparsity``."""
    return torch.sigmoid(a + b * target_logit(sparsity))


def learn_path(model, adapter: FamilyAdapter, shape: ModelShape, scores: pd.DataFrame,
               batches: list[tuple[torch.Tensor, torch.Tensor]],
               settings: PathSettings) -> tuple[pd.DataFrame, list[float]]:
    """Learn (a, b) per module; return the path table and the objective per step."""
    layout = build_layout(scores, shape, settings.prune_attention)
    a = torch.zeros(len(layout.names), requires_grad=True)
    b = torch.ones(len(layout.names), requires_grad=True)

    def keep_at(step: int) -> tuple[torch.Tensor, float]:
        sparsity = settings.grid[step % len(settings.grid)]
        return path_keep(a, b, sparsity), sparsity

    history = optimize_keep(model, adapter, shape, layout, batches, [a, b], settings, keep_at)
    table = pd.DataFrame({"kind": [n[0] for n in layout.names],
                          "layer": [n[1] for n in layout.names],
                          "module": [n[2] if n[0] == "mlp" else 0 for n in layout.names],
                          "a": a.detach().double().numpy(), "b": b.detach().double().numpy()})
    return table, history


def path_fractions(table: pd.DataFrame, scores: pd.DataFrame, shape: ModelShape,
                   sparsity: float, prune_attention: bool) -> Fractions:
    """The path's keep fractions at ``sparsity`` (modules in the table's order)."""
    layout = build_layout(scores, shape, prune_attention)
    names = [("mlp", int(r.layer), int(r.module)) if r.kind == "mlp" else ("attn", int(r.layer))
             for r in table.itertuples()]
    if names != layout.names:
        raise ValueError("the learned path does not match these scores' modules")
    a = torch.tensor(table["a"].to_numpy(), dtype=torch.float64)
    b = torch.tensor(table["b"].to_numpy(), dtype=torch.float64)
    return fractions_from_keep(path_keep(a, b, sparsity), layout, scores, shape)
