"""Stage 2 tables: per-source capture frames + layer weights -> units / channels / layers frames.

Input frames are the capture artifacts' tables (see ``tasks/capture.py``), one per
source, all of the same model. Output columns are documented in ``tasks/stats.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from gprune.maths.stats import (LayerWeights, channel_var, flap_standardized,
                                head_weight_scores, heads_mean, heads_sum, magnitude, peak,
                                mlp_weight_scores, rank_matrix, sensitivity)

KINDS = ("mlp", "attn")
# (total, sumsq, count, w_out) -> (C,) per-channel score; gprune.methods.importance has them
ChannelMetric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_MOMENTS = ("count", "sum", "sumsq", "sum_abs", "active")


@dataclass(frozen=True)
class ChannelBlock:
    """Statistics of one (layer, kind) block of channels, float64 tensors (C,)."""

    count: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor
    sum_abs: torch.Tensor
    active: torch.Tensor

    @staticmethod
    def pool(blocks: list["ChannelBlock"]) -> "ChannelBlock":
        """The statistics of all sources together (sums of the sums)."""
        return ChannelBlock(*(torch.stack([getattr(b, f) for b in blocks]).sum(0)
                              for f in _MOMENTS))


def channel_blocks(channels: pd.DataFrame) -> dict[tuple[int, str], ChannelBlock]:
    """Split one capture's channels frame into blocks keyed by (layer, kind), channel order."""
    blocks = {}
    for (layer, kind), part in channels.groupby(["layer", "kind"], sort=False):
        part = part.sort_values("channel")
        blocks[(int(layer), str(kind))] = ChannelBlock(*(
            torch.tensor(part[f].to_numpy(dtype=np.float64)) for f in _MOMENTS))
    return blocks


def _block_keys(num_layers: int) -> list[tuple[int, str]]:
    return [(layer, kind) for layer in range(num_layers) for kind in KINDS]


def unit_columns(kind: str, blocks: list[ChannelBlock], weights: LayerWeights, head_dim: int,
                 metrics: dict[str, ChannelMetric]) -> dict[str, object]:
    """Columns of one (layer, kind): weight_score, freq and the metric columns, per unit.

    ``metrics``: column name -> (total, sumsq, count, w_out) -> (C,) per-channel score."""
    weights = weights.float64()
    w_out = weights.mlp_out if kind == "mlp" else weights.attn_out
    if kind == "mlp":
        to_units, mean_to_units = (lambda v: v), (lambda v: v)
        weight_score = mlp_weight_scores(weights.mlp_out, weights.mlp_in)
    else:
        to_units = lambda v: heads_sum(v, head_dim)        # noqa: E731
        mean_to_units = lambda v: heads_mean(v, head_dim)  # noqa: E731
        weight_score = head_weight_scores(weights.attn_out, weights.attn_q, head_dim)
    freq = torch.stack([mean_to_units(b.active / b.count.clamp_min(1)) for b in blocks]).mean(0)
    columns: dict[str, object] = {"weight_score": weight_score.numpy(), "freq": freq.numpy()}
    pooled = ChannelBlock.pool(blocks)
    for metric, channel_metric in metrics.items():
        per_source = torch.stack([channel_metric(b.sum, b.sumsq, b.count, w_out)
                                  for b in blocks], dim=1)                     # (C, D)
        columns.update(_metric_columns(
            metric, per_source, channel_metric(pooled.sum, pooled.sumsq, pooled.count, w_out),
            to_units, None if kind == "mlp" else head_dim))
    return columns


def _metric_columns(metric: str, per_source: torch.Tensor, pooled: torch.Tensor,
                    to_units: Callable[[torch.Tensor], torch.Tensor],
                    head_dim: int | None) -> dict[str, object]:
    """One metric's unit columns from its channel scores: per_source (C, D), pooled (C,).

    ``head_dim``: None for MLP channels (unit = channel), else the head width."""
    scores = np.stack([to_units(per_source[:, d]).numpy()
                       for d in range(per_source.shape[1])], axis=1)            # (U, D)
    ranks = rank_matrix(scores)                                                # (U, D)
    channel_magnitude = torch.from_numpy(magnitude(per_source.numpy()))        # (C,)
    return {metric: list(scores), f"{metric}_rank": list(ranks),
            f"{metric}_sensitivity": sensitivity(ranks),
            f"{metric}_magnitude": magnitude(scores),
            f"{metric}_peak": peak(scores),
            f"{metric}_pooled": to_units(pooled).numpy(),
            f"{metric}_pooled_z": flap_standardized(pooled, head_dim).numpy(),
            f"{metric}_magnitude_z": flap_standardized(channel_magnitude, head_dim).numpy()}


def units_table(per_source: list[pd.DataFrame], weights: list[LayerWeights], head_dim: int,
                metrics: dict[str, ChannelMetric]) -> pd.DataFrame:
    """One row per (layer, kind, unit), layers ascending, mlp before attn, units ascending."""
    sources = [channel_blocks(frame) for frame in per_source]
    parts = []
    for layer, kind in _block_keys(len(weights)):
        columns = unit_columns(kind, [s[(layer, kind)] for s in sources], weights[layer],
                               head_dim, metrics)
        n_units = len(columns["freq"])
        parts.append(pd.DataFrame({"layer": np.full(n_units, layer, dtype=np.int32),
                                   "kind": [kind] * n_units,
                                   "unit": np.arange(n_units, dtype=np.int32), **columns}))
    return pd.concat(parts, ignore_index=True)


def pooled_channels(per_source: list[pd.DataFrame]) -> pd.DataFrame:
    """layer, kind, channel, count, mean, var over all sources (population variance)."""
    sources = [channel_blocks(frame) for frame in per_source]
    parts = []
    for (layer, kind) in sources[0]:
        pooled = ChannelBlock.pool([s[(layer, kind)] for s in sources])
        n = pooled.count.clamp_min(1)
        parts.append(pd.DataFrame({
            "layer": np.full(len(n), layer, dtype=np.int32), "kind": [kind] * len(n),
            "channel": np.arange(len(n), dtype=np.int32),
            "count": pooled.count.numpy().astype(np.int64), "mean": (pooled.sum / n).numpy(),
            "var": channel_var(pooled.sum, pooled.sumsq, pooled.count).numpy()}))
    return pd.concat(parts, ignore_index=True)


def pooled_layers(per_source: list[pd.DataFrame]) -> pd.DataFrame:
    """layer, cosine: the mean per-token cosine over all sources' tokens."""
    stacked = (pd.concat(per_source).groupby("layer", sort=True)
               [["cosine_sum", "cosine_count"]].sum())
    cosine = stacked["cosine_sum"] / stacked["cosine_count"].clip(lower=1)
    return pd.DataFrame({"layer": stacked.index.to_numpy(dtype=np.int32),
                         "cosine": cosine.to_numpy(dtype=np.float64)})
