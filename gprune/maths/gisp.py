"""GISP's iterative schedule: one global ranking per step, a trajectory of nested masks.

GISP (arXiv 2510.18030, "From Local to Global: Revisiting Structured Pruning Paradigms
for LLMs"; reference code uncc-efficient-ai/GISP) scores every structure by a first-order
loss estimate, ranks all of them globally, and raises the pruned fraction from 0 to its
largest target in ``steps`` steps, rescoring the masked model at each step. What one
step removes is the lowest-scored alive structures until the pruned parameters reach
that step's goal; every removal gets the next *position*, so the trajectory is one
order and the plan of any target is a prefix of it (nested by construction: whatever
40% keeps, 30% keeps too).

Structures: an MLP channel; under MHA a head (its q/k/v rows, its o columns); under GQA
GISP prunes query heads only, and this project's plans need every kept KV group to keep
the same number of query heads, so the attention structure is a *slice*: the weakest
alive query head of every KV group at once (score: their mean); the slice that empties a
layer also frees its k/v. Protected layers (the first ``protect_first`` of them and the
last ``protect_last``, as the reference skips) are never touched; MLP floors hold.

Pure: the scores of the masked model come from a callback; tables are DataFrames.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from gprune.maths.allocate import Allocation
from gprune.maths.budget import mlp_floor, prunable_params
from gprune.models.adapters import ModelShape

NEVER = 2**31 - 1          # the position of a structure the trajectory never removed
# (alive mlp (L, I) bool, alive heads (L, H) bool) -> (mlp scores (L, I), head scores (L, H), loss)
ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class GispSettings:
    steps: int = 12                # T: scoring rounds from 0 to ``end``
    end: float = 0.6               # pruned fraction after the last step
    protect_first: float = 0.1     # fraction of the first layers never pruned
    protect_last: int = 1          # last layers never pruned
    floor: float = 0.1             # min fraction of MLP channels per layer
    prune_attention: bool = True


def protected_layers(num_layers: int, first: float, last: int) -> set[int]:
    """The reference's skipped layers: ``range(int(L * first))`` and the last ``last``."""
    return set(range(int(num_layers * first))) | set(range(max(num_layers - last, 0), num_layers))


def removable_fraction(shape: ModelShape, settings: GispSettings) -> float:
    """The largest pruned fraction the protected layers and the floors allow."""
    free = shape.num_layers - len(protected_layers(shape.num_layers, settings.protect_first,
                                                   settings.protect_last))
    per_layer = (shape.intermediate - mlp_floor(shape.intermediate, settings.floor)) \
        * shape.params_per_channel
    if settings.prune_attention:
        per_layer += shape.layer_params(0, shape.heads, shape.kv_heads)
    return free * per_layer / prunable_params(shape)


def trajectory_end(shape: ModelShape, settings: GispSettings, largest: float) -> float:
    """Where the trajectory stops: ``largest`` (the path grid's largest target), or the
    largest whole percent the protected layers and floors allow when that is less."""
    return min(largest, math.floor(removable_fraction(shape, settings) * 100 + 1e-9) / 100)


def check_settings(shape: ModelShape, settings: GispSettings) -> None:
    """One-line errors before any work: no prunable layer, a goal beyond what is allowed."""
    if settings.steps < 1:
        raise ValueError(f"gisp needs at least one step; got steps={settings.steps}")
    if len(protected_layers(shape.num_layers, settings.protect_first,
                            settings.protect_last)) >= shape.num_layers:
        raise ValueError(f"the protected layers (first {settings.protect_first:.0%}, last "
                         f"{settings.protect_last}) cover all {shape.num_layers} layers; "
                         "lower protect_first or protect_last")
    limit = removable_fraction(shape, settings)
    if settings.end > limit + 1e-9:
        raise ValueError(f"sparsity {settings.end:.3f} is beyond what the protected layers and "
                         f"floors allow ({limit:.3f}); lower the target or protect fewer layers")


def trajectory(shape: ModelShape, settings: GispSettings, score_fn: ScoreFn,
               progress: Callable[[int, dict], None] = lambda step, info: None
               ) -> tuple[pd.DataFrame, list[dict]]:
    """Run the schedule; the table (kind, layer, unit, position, step, params) of every
    structure and one record per step (goal, loss, seconds)."""
    check_settings(shape, settings)
    alive_mlp = torch.ones(shape.num_layers, shape.intermediate, dtype=torch.bool)   # (L, I)
    alive_heads = torch.ones(shape.num_layers, shape.heads, dtype=torch.bool)        # (L, H)
    pos_mlp = torch.full(alive_mlp.shape, NEVER, dtype=torch.long)
    pos_heads = torch.full(alive_heads.shape, NEVER, dtype=torch.long)
    step_mlp, step_heads = torch.zeros_like(pos_mlp), torch.zeros_like(pos_heads)
    state = {"removed": 0.0, "position": 0}
    total, history = prunable_params(shape), []
    for step in range(1, settings.steps + 1):
        started = time.time()
        mlp_s, head_s, loss = score_fn(alive_mlp, alive_heads)
        goal = settings.end * step / settings.steps * total
        for kind, layer, units in _removals(shape, settings, mlp_s, head_s, alive_mlp,
                                            alive_heads, goal - state["removed"]):
            alive, pos, steps = ((alive_mlp, pos_mlp, step_mlp) if kind == "mlp"
                                 else (alive_heads, pos_heads, step_heads))
            alive[layer, units] = False
            pos[layer, units] = state["position"]
            steps[layer, units] = step
            state["position"] += 1
            state["removed"] += _freed(shape, kind, layer, units, alive_heads)
        info = {"step": step, "goal": goal / total, "pruned": state["removed"] / total,
                "loss": loss, "seconds": round(time.time() - started, 3)}
        history.append(info)
        progress(step, info)
    return _table(shape, pos_mlp, step_mlp, pos_heads, step_heads), history


def _freed(shape: ModelShape, kind: str, layer: int, units: list[int],
           alive_heads: torch.Tensor) -> float:
    """Parameters freed by removing ``units`` (already marked dead)."""
    if kind == "mlp":
        return len(units) * shape.params_per_channel
    freed = len(units) * shape.q_params_per_head
    groups = alive_heads[layer].view(shape.kv_heads, shape.group_size)               # (G, g)
    emptied = {u // shape.group_size for u in units if not groups[u // shape.group_size].any()}
    return freed + len(emptied) * shape.kv_params_per_group


def _removals(shape, settings, mlp_s, head_s, alive_mlp, alive_heads, budget: float):
    """Yield (kind, layer, units) in ascending score until ``budget`` params are freed.
    The caller marks each yielded removal dead before asking for the next: the floors and
    a layer's next head slice read ``alive_mlp`` / ``alive_heads`` as they are then."""
    skip = protected_layers(shape.num_layers, settings.protect_first, settings.protect_last)
    layers = [l for l in range(shape.num_layers) if l not in skip]
    heap: list[tuple[float, int, str, int, tuple[int, ...]]] = []
    tie = 0
    for layer in layers:
        for unit in torch.nonzero(alive_mlp[layer]).flatten().tolist():
            heap.append((float(mlp_s[layer, unit]), tie := tie + 1, "mlp", layer, (unit,)))
    heapq.heapify(heap)
    if settings.prune_attention:
        for layer in layers:
            for candidate in _head_candidates(shape, layer, head_s, alive_heads):
                heapq.heappush(heap, (*candidate[:1], tie := tie + 1, "attn", layer, candidate[1]))
    floors = mlp_floor(shape.intermediate, settings.floor)
    freed = 0.0
    while heap and freed < budget - 1e-6:
        _score, _tie, kind, layer, units = heapq.heappop(heap)
        if kind == "mlp" and int(alive_mlp[layer].sum()) <= floors:
            continue
        freed += _freed_preview(shape, kind, layer, units, alive_heads)
        yield kind, layer, list(units)
        if kind == "attn" and shape.group_size > 1:     # the layer's next slice, if any
            for candidate in _head_candidates(shape, layer, head_s, alive_heads):
                heapq.heappush(heap, (*candidate[:1], tie := tie + 1, "attn", layer, candidate[1]))


def _freed_preview(shape, kind, layer, units, alive_heads) -> float:
    if kind == "mlp":
        return len(units) * shape.params_per_channel
    after = alive_heads.clone()
    after[layer, list(units)] = False
    return _freed(shape, kind, layer, list(units), after)


def _head_candidates(shape: ModelShape, layer: int, head_s: torch.Tensor,
                     alive_heads: torch.Tensor) -> list[tuple[float, tuple[int, ...]]]:
    """MHA: every alive head; GQA: one slice (the weakest alive head of each group)."""
    alive = alive_heads[layer]
    if shape.group_size == 1:
        return [(float(head_s[layer, h]), (h,)) for h in torch.nonzero(alive).flatten().tolist()]
    if not alive.any():
        return []
    scores = torch.where(alive, head_s[layer].double(), torch.full_like(head_s[layer].double(), math.inf))
    weakest = scores.view(shape.kv_heads, shape.group_size).argmin(dim=1)             # (G,)
    heads = tuple(int(g * shape.group_size + w) for g, w in enumerate(weakest.tolist()))
    return [(float(head_s[layer, list(heads)].double().mean()), heads)]


def _table(shape, pos_mlp, step_mlp, pos_heads, step_heads) -> pd.DataFrame:
    def rows(kind, pos, steps, size):
        layer, unit = np.meshgrid(np.arange(shape.num_layers), np.arange(size), indexing="ij")
        return pd.DataFrame({"kind": kind, "layer": layer.ravel(), "unit": unit.ravel(),
                             "position": pos.numpy().ravel(), "step": steps.numpy().ravel()})

    return pd.concat([rows("mlp", pos_mlp, step_mlp, shape.intermediate),
                      rows("attn", pos_heads, step_heads, shape.heads)], ignore_index=True)


def removal_params(table: pd.DataFrame, shape: ModelShape) -> pd.Series:
    """Parameters each removal position freed (index: position, ascending)."""
    gone = table[table.position < NEVER]
    mlp = gone[gone.kind == "mlp"].groupby("position").size() * shape.params_per_channel
    heads = gone[gone.kind == "attn"]
    q = heads.groupby("position").size() * shape.q_params_per_head
    # a KV group is freed by the position that removed its last query head
    last = heads.assign(group=heads.unit // shape.group_size).groupby(["layer", "group"])
    full = last.size() == shape.group_size
    kv = last.position.max()[full].value_counts() * shape.kv_params_per_group
    return mlp.add(q, fill_value=0).add(kv, fill_value=0).sort_index()


def cutoff(table: pd.DataFrame, shape: ModelShape, sparsity: float,
           mode: str = "nearest") -> int:
    """The last position a plan at ``sparsity`` removes: the prefix of the trajectory whose
    freed parameters come nearest to ``sparsity`` of the prunable ones (the larger on a
    tie; ``below`` / ``above``: the nearest not beyond / not short of it). Monotone in
    ``sparsity``, so plans are nested; ``nearest`` is off the target by at most half of
    one removal (a head slice of SmolLM2: 0.2 pp)."""
    freed = removal_params(table, shape).cumsum()                       # by position
    total = prunable_params(shape)
    need = sparsity * total
    end = float(freed.iloc[-1]) if len(freed) else 0.0
    if need > end + 0.5 * (end - float(freed.iloc[-2]) if len(freed) > 1 else end) + 1e-6:
        raise ValueError(f"sparsity {sparsity:.3f} is beyond the GISP trajectory (it ends at "
                         f"{end / total:.3f}); widen the path grid or lower the target")
    reach = np.concatenate([[0.0], freed.to_numpy()])                  # (positions + 1,)
    gaps = np.abs(reach - need)
    if mode != "nearest":
        wrong = reach > need + 1e-6 if mode == "below" else reach < need - 1e-6
        gaps = np.where(wrong, np.inf, gaps)
    best = int(np.flatnonzero(gaps <= gaps.min() + 1e-6)[-1 if mode != "above" else 0])
    return int(freed.index[best - 1]) if best else -1


def kept_at(table: pd.DataFrame, shape: ModelShape, sparsity: float,
            tolerance: float = 0.005) -> pd.DataFrame:
    """``table`` with a ``kept`` column: the structures a plan at ``sparsity`` keeps.

    The nearest prefix of the trajectory when it is within ``tolerance`` of the target;
    otherwise (structures too coarse for the budget, e.g. a tiny model's head slices)
    the longest prefix below the target plus the trajectory's next MLP channels, or the
    shortest prefix beyond it less its last-removed MLP channels, whichever meets the
    budget: then this target's plan may not nest in the others (``nested`` False)."""
    total = prunable_params(shape)
    need = sparsity * total
    kept = table.assign(kept=table.position > cutoff(table, shape, sparsity))
    if abs(_removed(kept, shape) - need) <= tolerance * total:
        return kept.assign(nested=True)
    for mode in ("below", "above"):
        kept = table.assign(kept=table.position > cutoff(table, shape, sparsity, mode))
        gap = need - _removed(kept, shape)                      # > 0: remove more channels
        flip = kept[(kept.kind == "mlp") & (kept.position < NEVER)
                    & (kept.kept if gap > 0 else ~kept.kept)]
        count = int(math.ceil(gap / shape.params_per_channel - 1e-9) if gap > 0
                    else math.floor(-gap / shape.params_per_channel + 1e-9))
        chosen = flip.sort_values("position", ascending=gap > 0).index[:count]
        kept.loc[chosen, "kept"] = gap <= 0                   # removed more, or restored
        if abs(_removed(kept, shape) - need) <= tolerance * total:
            break
    return kept.assign(nested=False)


def _removed(kept: pd.DataFrame, shape: ModelShape) -> float:
    """Prunable parameters the structures not kept free (k/v of emptied groups included)."""
    return float(prunable_params(shape) - allocation_of(kept, shape).kept_params(shape))


def allocation_of(kept: pd.DataFrame, shape: ModelShape) -> Allocation:
    """The keep counts of a ``kept_at`` table: MLP channels per layer (one module) and each
    layer's (KV groups, heads per group)."""
    mlp = kept[kept.kind == "mlp"].groupby("layer").kept.sum()
    heads = kept[kept.kind == "attn"].sort_values(["layer", "unit"])
    configs = {int(l): head_config(g.kept.to_numpy(), shape) for l, g in heads.groupby("layer")}
    return Allocation({(int(l), 0): int(n) for l, n in mlp.items()}, configs)


def head_config(kept_heads: np.ndarray, shape: ModelShape) -> tuple[int, int]:
    """(kept KV groups, heads per kept group) of one layer's kept query heads (H,) bool."""
    per_group = kept_heads.reshape(shape.kv_heads, shape.group_size).sum(axis=1)   # (G,)
    groups = int((per_group > 0).sum())
    if groups and len(set(per_group[per_group > 0].tolist())) != 1:
        raise ValueError(f"kept heads {np.flatnonzero(kept_heads).tolist()} are not GQA-feasible")
    return groups, int(per_group.max()) if groups else 0
