"""Importance criteria of a unit (an MLP channel or a query head), by name.

A criterion is a small class: its ``name`` (the column prefix in ``units.parquet``),
whether it reads activations, and, for an activation criterion, the per-channel
score from a channel block's moments and its output projection. The stats stage
computes every activation criterion of the registry; the partition and score stages
read their columns. A weight-only criterion (``weight``: magnitude) has no per-source
columns, so it has no distribution sensitivity and the reliability gate does not apply;
it partitions by ``partition_signal``. Register a new one with ``@register_importance``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from gprune.maths.stats import channel_rms, channel_var, flap_channels, wanda_sp_channels
from gprune.methods.named import Registry


class Importance:
    name: ClassVar[str]
    uses_activations: ClassVar[bool] = True
    partition_signal: ClassVar[str | None] = None   # None: its own columns

    @staticmethod
    def channels(total: torch.Tensor, sumsq: torch.Tensor, count: torch.Tensor,
                 w_out: torch.Tensor) -> torch.Tensor:
        """(C,) score per channel from (C,) moments and w_out (out, C)."""
        raise NotImplementedError


IMPORTANCE: Registry[Importance] = Registry("importance criterion")
register_importance = IMPORTANCE.register
importance = IMPORTANCE.lookup
CriterionName = IMPORTANCE.name_type()  # a method parameter's type


def activation_criteria() -> tuple[str, ...]:
    """Names of the criteria the stats stage computes per source."""
    return tuple(n for n, c in IMPORTANCE.items() if c.uses_activations)


def signal_of(name: str) -> str:
    """The activation criterion whose columns describe units for ``name`` (partition,
    sensitivity summaries)."""
    cls = importance(name)
    return cls.name if cls.uses_activations else (cls.partition_signal or "wanda_sp")


@register_importance
class WandaSp(Importance):
    """RMS(x_c) * mean_i |W_out[i, c]| (Wanda-sp, An et al. 2024, arXiv 2312.11983)."""

    name = "wanda_sp"

    @staticmethod
    def channels(total, sumsq, count, w_out):
        return wanda_sp_channels(channel_rms(sumsq, count), w_out)


@register_importance
class Flap(Importance):
    """Var[x_c] * ||W_out[:, c]||^2, FLAP's fluctuation (An et al. 2024, arXiv 2312.11983)."""

    name = "flap"

    @staticmethod
    def channels(total, sumsq, count, w_out):
        return flap_channels(channel_var(total, sumsq, count), w_out)


@register_importance
class Magnitude(Importance):
    """Weight norms only (``weight_score`` in units.parquet): no activations."""

    name = "weight"
    uses_activations = False
    partition_signal = "wanda_sp"
