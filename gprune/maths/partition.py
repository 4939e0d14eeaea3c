"""Stage 3: partition each layer's MLP channels into behaviour-consistent modules.

Features per channel (METHOD.md stage 3): its within-layer rank on every
calibration source, its distribution sensitivity and its log magnitude,
standardized, clustered with KMeans (fixed seed and n_init: deterministic).
Attention heads are few per layer, so a layer's heads form one module.
K = 1 is the no-partition ablation.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from gprune.errors import ConfigError


def unit_features(layer_units: pd.DataFrame, metric: str) -> np.ndarray:
    """(n_units, D + 2) features: per-source ranks, sensitivity, log magnitude.

    With a single source the sensitivity is undefined and left out.
    """
    ranks = np.stack(layer_units[f"{metric}_rank"].to_numpy())            # (n, D)
    columns = [ranks]
    sensitivity = layer_units[f"{metric}_sensitivity"].to_numpy(dtype=float)
    if not np.isnan(sensitivity).any():
        columns.append(sensitivity[:, None])
    magnitude = layer_units[f"{metric}_magnitude"].to_numpy(dtype=float)
    columns.append(np.log(np.maximum(magnitude, 1e-12))[:, None])
    return np.concatenate(columns, axis=1)


def standardize(features: np.ndarray) -> np.ndarray:
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def cluster(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """KMeans labels renumbered by first appearance, so labels do not depend on KMeans' order."""
    if k == 1:
        return np.zeros(len(features), dtype=np.int32)
    with threadpool_limits(1):  # tiny problems: OpenMP threads only spin (200x slower when busy)
        raw = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(standardize(features))
    first_seen = {label: i for i, label in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([first_seen[label] for label in raw], dtype=np.int32)


def check_k(units: pd.DataFrame, k: int) -> None:
    smallest = units[units.kind == "mlp"].groupby("layer").size().min()
    if k > smallest:
        raise ConfigError(f"k={k} modules is more than the {smallest} MLP channels of a layer; "
                          f"choose k <= {smallest}")


def partition_units(units: pd.DataFrame, k: int, metric: str, seed: int = 0,
                    n_init: int = 10) -> pd.DataFrame:
    """Module label of every unit: DataFrame[layer, kind, unit, module]."""
    check_k(units, k)
    parts = []
    for (layer, kind), group in units.groupby(["layer", "kind"], sort=True):
        if kind == "mlp":
            labels = cluster(unit_features(group, metric), k, seed, n_init)
        else:
            labels = np.zeros(len(group), dtype=np.int32)
        parts.append(pd.DataFrame({"layer": group.layer.to_numpy(), "kind": kind,
                                   "unit": group.unit.to_numpy(), "module": labels}))
    return pd.concat(parts, ignore_index=True)
