"""FANG (arXiv 2512.23014): function-aware neuron groups, token-weighted in-group scores and
block sparsity from functional complexity. Pure functions on tensors.

- ``association`` (K, C): how much each MLP channel serves each context type. The
  reference uses Taylor scores |activation x gradient| averaged over the tokens of a
  context; here the activation-only proxy mean_t |x_tc| * ||W_out[:, c]|| (no backward
  pass; docs/METHOD_NOTES.md says why).
- ``assign_groups``: K + 1 groups of equal size (sizes differ by at most one): the shared
  group first (the channels in the top group-size of the most contexts, as the reference's
  residual expert), then the rest by a linear assignment (maximum total association,
  each context a group of fixed capacity).
- ``weighted_flap`` / ``weighted_obs``: in-group scores with tokens weighted by alpha
  (``gprune.maths.contexts.context_weights``): FLAP's fluctuation Var_alpha[x_c] *
  ||W_out[:, c]||^2, or the OBS criterion ||W_out[:, c]||^2 / [H_g^-1]_cc on the group's
  alpha-weighted Gram H_g (damped by 1e-2 of its mean diagonal, as the reference).
- ``block_sparsity``: FC_l = 1 - E[cos(X_l, X_l+1)], mapped linearly into
  [(1 - spread) S, (1 + spread) S] (higher FC, lower sparsity), shifted to average S.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gprune.errors import ConfigError

SHARED = 0   # group id of the shared group; context j's group is j + 1
OBS_DAMP = 1e-2


def association(acts: torch.Tensor, labels: torch.Tensor, w_out_sq: torch.Tensor,
                k: int) -> torch.Tensor:
    """(k, C) mean |x_c| over the tokens of each context times ||W_out[:, c]||.
    acts (n, C) channel activations, labels (n,) nearest context, w_out_sq (C,)."""
    total = torch.zeros(k, acts.shape[1], dtype=torch.float64)
    total.index_add_(0, labels, acts.double().abs())                        # (k, C)
    counts = torch.bincount(labels, minlength=k).clamp(min=1).double()      # (k,)
    return total / counts[:, None] * w_out_sq.double().sqrt()[None, :]


def group_sizes(n: int, groups: int) -> list[int]:
    """``groups`` sizes summing to n, differing by at most one (larger first)."""
    if groups > n:
        raise ConfigError(f"fang: {groups} groups do not fit {n} MLP channels; lower k")
    base, extra = divmod(n, groups)
    return [base + (i < extra) for i in range(groups)]


def shared_channels(assoc: torch.Tensor, size: int) -> np.ndarray:
    """(size,) channels in the top-``size`` of the most contexts (ties: higher mean
    normalized association first, then the lower index)."""
    k, c = assoc.shape
    norm = (assoc / assoc.mean(1, keepdim=True).clamp(min=1e-30)).numpy()   # (k, C)
    top = np.argsort(-norm, axis=1, kind="stable")[:, :size]                # (k, size)
    hits = np.bincount(top.ravel(), minlength=c)                            # (C,)
    order = np.lexsort((np.arange(c), -norm.mean(0), -hits))
    return np.sort(order[:size])


def assign_groups(assoc: torch.Tensor, shared: bool = True) -> np.ndarray:
    """(C,) group of every channel: SHARED (when ``shared``) or context j + 1. Equal sizes;
    the non-shared channels go to contexts by a linear assignment maximizing the total
    normalized association."""
    k, c = assoc.shape
    sizes = group_sizes(c, k + 1 if shared else k)
    labels = np.full(c, -1, dtype=np.int64)
    if shared:
        labels[shared_channels(assoc, sizes[0])] = SHARED
        sizes = sizes[1:]
    rest = np.flatnonzero(labels < 0)                                        # (m,)
    if k == 1:                                   # one context: nothing to assign
        labels[rest] = 1
        return labels
    norm = (assoc / assoc.mean(1, keepdim=True).clamp(min=1e-30)).numpy()
    slots = np.repeat(np.arange(k), sizes)                                   # (m,) context per slot
    cost = -norm[slots][:, rest]                                             # (m slots, m channels)
    slot_of, channel_of = linear_sum_assignment(cost)
    labels[rest[channel_of]] = slots[slot_of] + 1
    return labels


def weighted_flap(acts: torch.Tensor, alpha: torch.Tensor, w_out_sq: torch.Tensor) -> torch.Tensor:
    """(C,) alpha-weighted fluctuation Var_alpha[x_c] * ||W_out[:, c]||^2;
    acts (n, C), alpha (n,) token weights, w_out_sq (C,)."""
    x, w = acts.double(), alpha.double()[:, None]                            # (n, C), (n, 1)
    mean = (w * x).sum(0) / w.sum()                                          # (C,)
    var = (w * (x - mean).square()).sum(0) / w.sum()                         # (C,)
    return var * w_out_sq.double()


def weighted_obs(acts: torch.Tensor, alpha: torch.Tensor, w_out_sq: torch.Tensor,
                 damp: float = OBS_DAMP) -> torch.Tensor:
    """(C,) OBS removal cost ||W_out[:, c]||^2 / [H^-1]_cc of each channel of a group, H the
    alpha-weighted Gram of its activations acts (n, C) plus damp * mean diag."""
    x, w = acts.double(), alpha.double()[:, None]
    gram = (w * x).T @ x / w.sum()                                           # (C, C)
    gram += damp * gram.diagonal().mean().clamp(min=1e-30) * torch.eye(len(gram),
                                                                        dtype=gram.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))            # (C, C)
    return w_out_sq.double() / inverse.diagonal()


def group_scores(acts: torch.Tensor, alpha: torch.Tensor, labels: np.ndarray,
                 w_out_sq: torch.Tensor, variant: str) -> np.ndarray:
    """(C,) every channel's score inside its group: context j + 1 weights tokens by
    alpha[:, j]; the shared group weighs every token alike. acts (n, C), alpha (n, K)."""
    score = weighted_flap if variant == "flap" else weighted_obs
    out = np.zeros(acts.shape[1])
    for group in np.unique(labels):
        cols = torch.from_numpy(np.flatnonzero(labels == group))
        weights = torch.ones(len(acts), dtype=torch.float64) if group == SHARED \
            else alpha[:, int(group) - 1]
        out[cols.numpy()] = score(acts[:, cols], weights, w_out_sq[cols]).numpy()
    return out


def block_sparsity(cosine: np.ndarray, sparsity: float, spread: float = 0.5) -> np.ndarray:
    """(L,) per-block sparsity: FC = 1 - cosine min-max scaled into
    [(1 - spread) S, (1 + spread) S] (high FC -> low sparsity), shifted to mean S and kept
    in [0, 0.95] (the clipped excess spread over the other blocks)."""
    fc = 1.0 - np.asarray(cosine, dtype=float)                               # (L,)
    width = fc.max() - fc.min()
    unit = (fc - fc.min()) / width if width > 0 else np.zeros_like(fc)
    s = sparsity * (1 + spread) - 2 * spread * sparsity * unit
    s += sparsity - s.mean()
    for _ in range(100):
        clipped = np.clip(s, 0.0, 0.95)
        free = (clipped > 0.0) & (clipped < 0.95)
        gap = sparsity - clipped.mean()
        if abs(gap) < 1e-12 or not free.any():
            return clipped
        s = clipped + np.where(free, gap * len(s) / free.sum(), 0.0)
    return np.clip(s, 0.0, 0.95)


def fang_fractions(scores, shape, sparsity: float, prune_attention: bool):
    """Keep fractions (``gprune.maths.allocate.Fractions``) from FANG's score table: block l
    keeps 1 - s_l (``block_sparsity`` of its ``fc`` column, ``spread``); its shared group
    (module SHARED) keeps at least its ``floor``, the context groups share the rest alike;
    attention keeps 1 - s_l of its heads (when pruned)."""
    from gprune.maths.allocate import Fractions, module_sizes

    mlp = scores[scores.kind == "mlp"]
    per_layer = mlp.groupby("layer").agg(fc=("fc", "first"), spread=("spread", "first"),
                                         floor=("floor", "first")).sort_index()
    if list(per_layer.index) != list(range(shape.num_layers)):
        raise ConfigError("fang: the score table lacks MLP channels of some layers")
    spread = float(per_layer.spread.iloc[0])
    blocks = block_sparsity(1.0 - per_layer.fc.to_numpy(), sparsity, spread)   # (L,)
    sizes = module_sizes(scores)
    fractions, floors = {}, {}
    for layer, s in enumerate(blocks):
        modules = {m: n for (l, m), n in sizes.items() if l == layer}
        total, shared = sum(modules.values()), modules.get(SHARED, 0)
        floor = float(per_layer.floor.iloc[layer])
        keep_shared = min(1.0, max(floor, 1.0 - s)) if shared else 0.0
        rest = ((1.0 - s) * total - keep_shared * shared) / max(total - shared, 1)
        for module in modules:
            fractions[(layer, module)] = keep_shared if module == SHARED and shared else \
                float(np.clip(rest, 0.0, 1.0))
        if shared:
            floors[(layer, SHARED)] = floor
    attn = {layer: (1.0 - float(s)) if prune_attention else 1.0 for layer, s in enumerate(blocks)}
    return Fractions(fractions, sizes, attn, floors)


def layer_groups(ctx: dict[str, torch.Tensor], tau: float, shared: bool,
                 variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(groups (C,), in-group scores (C,)) of one layer from its contexts tensors (z (n,
    dim), acts (n, C), centroids (K, dim), w_out_sq (C,))."""
    from gprune.maths.contexts import context_distances, context_weights

    dist = context_distances(ctx["z"], ctx["centroids"])                     # (n, K)
    alpha = context_weights(dist, tau)                                       # (n, K)
    k = ctx["centroids"].shape[0]
    assoc = association(ctx["acts"], dist.argmin(1), ctx["w_out_sq"], k)    # (K, C)
    groups = assign_groups(assoc, shared)
    return groups, group_scores(ctx["acts"], alpha, groups, ctx["w_out_sq"], variant)
