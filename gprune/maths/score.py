"""Stage 4: reliability-gated, module-local scoring (METHOD.md stage 4).

A module is unreliable when its mean distribution sensitivity is above the
layer's ``q_sigma`` quantile AND its mean magnitude is below the layer's
``q_m`` quantile: its units are then scored by the activation-independent
weight score. Reliable modules use the activation metric aggregated over
sources (mean of per-source layer-normalized scores, so no source dominates:
that is the unit's magnitude). Scores are finally ranked inside each module,
so units compete only with their own module.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gprune.errors import ConfigError
from gprune.maths.stats import scaled_rank

SIGMA_EPS = 1e-9


AGGREGATE_COLUMNS = {"normalized_mean": "magnitude", "pooled": "pooled", "peak": "peak"}


def activation_column(metric: str, aggregate: str) -> str:
    """The stats column of the activation metric aggregated over sources: the mean of the
    layer-normalized per-source scores, the score of the pooled statistics, or the peak
    (largest layer-normalized per-source score)."""
    if aggregate not in AGGREGATE_COLUMNS:
        raise ConfigError(f"aggregate must be one of {', '.join(AGGREGATE_COLUMNS)}, "
                          f"got {aggregate!r}")
    return f"{metric}_{AGGREGATE_COLUMNS[aggregate]}"


def activation_score(units: pd.DataFrame, metric: str, aggregate: str) -> np.ndarray:
    """The activation metric per unit: normalized mean over sources, or from pooled statistics."""
    return units[activation_column(metric, aggregate)].to_numpy(dtype=float)


def standardized_score(units: pd.DataFrame, metric: str | None, aggregate: str) -> np.ndarray:
    """FLAP's standardized score of the same signal (stats ``..._z``; NaN where absent)."""
    column = f"{activation_column(metric, aggregate)}_z" if metric else None
    if column not in units:
        return np.full(len(units), np.nan)
    return units[column].to_numpy(dtype=float)


def heads_by_standardized(scores: pd.DataFrame) -> pd.DataFrame:
    """Heads ranked by their standardized score ``z`` (FLAP's head rule), where they have one."""
    out = scores.copy()
    heads = (out.kind == "attn") & out.z.notna()
    out.loc[heads, "raw"] = out.loc[heads, "z"]
    out["score"] = out.groupby(["layer", "kind", "module"]).raw.transform(scaled_rank)
    return out


def gate_modules(modules: pd.DataFrame, q_sigma: float, q_m: float) -> pd.DataFrame:
    """Add metric_used and reason per module from layer quantiles of unit sigma and m."""
    out = modules.copy()
    above = out.mean_sensitivity > out.sigma_threshold + SIGMA_EPS   # rank noise is not sensitivity
    unreliable = above & (out.mean_magnitude < out.m_threshold)
    out["metric_used"] = np.where(unreliable, "weight", "activation")
    out["reason"] = np.where(
        unreliable,
        f"mean sensitivity above the layer's q{q_sigma:g} quantile and mean magnitude below its q{q_m:g} quantile",
        "reliable: activation signal is stable or strong")
    return out


def summarize_modules(units: pd.DataFrame, metric: str, q_sigma: float, q_m: float) -> pd.DataFrame:
    """Per (layer, kind, module): size, mean sensitivity / magnitude and the layer thresholds."""
    sigma, mag = f"{metric}_sensitivity", f"{metric}_magnitude"
    layer = units.groupby(["layer", "kind"]).agg(
        sigma_threshold=(sigma, lambda s: s.quantile(q_sigma)),
        m_threshold=(mag, lambda s: s.quantile(q_m))).reset_index()
    modules = units.groupby(["layer", "kind", "module"]).agg(
        size=("unit", "size"), mean_sensitivity=(sigma, "mean"),
        mean_magnitude=(mag, "mean")).reset_index()
    return modules.merge(layer, on=["layer", "kind"])


def score_units(units: pd.DataFrame, modules_of_units: pd.DataFrame, metric: str | None,
                signal: str, aggregate: str = "normalized_mean", gate: bool = True,
                q_sigma: float = 0.75, q_m: float = 0.25) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gated module-local scores.

    units: stats rows (layer, kind, unit, metric columns, weight_score);
    modules_of_units: (layer, kind, unit, module) from the partition stage;
    metric: the activation metric's column prefix, or None to score by ``weight_score``
    only (no activations, so no gate); signal: the activation metric whose sensitivity
    and magnitude describe (and gate) the modules.
    Returns (scores[layer, kind, unit, module, metric_used, raw, score, z], modules summary);
    z: FLAP's standardized score of activation-scored units (NaN for weight-scored ones).
    """
    gated = gate and metric is not None
    if gated and units[f"{signal}_sensitivity"].isna().any():
        raise ConfigError("the reliability gate needs distribution sensitivity from >= 2 "
                          "calibration sources; add sources or turn the gate off (gate=false)")
    table = units.merge(modules_of_units, on=["layer", "kind", "unit"], validate="one_to_one")
    modules = summarize_modules(table, signal, q_sigma, q_m)
    if gated:
        modules = gate_modules(modules, q_sigma, q_m)
    else:
        modules["metric_used"] = "weight" if metric is None else "activation"
        modules["reason"] = "weight-only method" if metric is None else "gate off"
    table = table.merge(modules[["layer", "kind", "module", "metric_used"]],
                        on=["layer", "kind", "module"])
    activation = (table.weight_score.to_numpy() if metric is None
                  else activation_score(table, metric, aggregate))
    table["raw"] = np.where(table.metric_used == "weight", table.weight_score, activation)
    table["score"] = table.groupby(["layer", "kind", "module"]).raw.transform(scaled_rank)
    table["z"] = np.where(table.metric_used == "weight", np.nan,
                          standardized_score(table, metric, aggregate))
    scores = table[["layer", "kind", "unit", "module", "metric_used", "raw", "score", "z"]]
    return scores.sort_values(["layer", "kind", "unit"], ignore_index=True), modules
