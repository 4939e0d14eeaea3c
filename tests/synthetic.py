"""Synthetic test inputs: stats tables with the `units.parquet` schema (stages 3-5) and
tiny models with a NaN weight, plus the check that a pass left no hook behind."""
from __future__ import annotations

import numpy as np
import pandas as pd

import torch

from gprune.methods.importance import activation_criteria
from gprune.models.adapters import ModelShape, adapter_for
from gprune.models.tiny import tiny_model

TINY_SHAPE = ModelShape(num_layers=3, hidden=64, intermediate=96, heads=4, kv_heads=2,
                        head_dim=16, gated=True)


def ranks01(values: np.ndarray) -> np.ndarray:
    order = pd.Series(values).rank(method="average").to_numpy()
    return (order - 1) / max(len(values) - 1, 1)


def units_table(per_source: dict[tuple[int, str], np.ndarray], weight: dict[tuple[int, str], np.ndarray]
                ) -> pd.DataFrame:
    """Build units rows from per-(layer, kind) score matrices of shape (n_units, D)."""
    rows = []
    for (layer, kind), scores in sorted(per_source.items()):
        ranks = np.stack([ranks01(scores[:, d]) for d in range(scores.shape[1])], axis=1)
        normalized = scores / scores.mean(axis=0, keepdims=True)
        sens = ranks.std(axis=1) if scores.shape[1] > 1 else np.full(len(scores), np.nan)
        for unit in range(len(scores)):
            row = {"layer": layer, "kind": kind, "unit": unit, "weight_score": weight[(layer, kind)][unit],
                   "freq": 0.5}
            for metric in activation_criteria():
                row[metric] = scores[unit].tolist()
                row[f"{metric}_rank"] = ranks[unit].tolist()
                row[f"{metric}_sensitivity"] = sens[unit]
                row[f"{metric}_magnitude"] = normalized[unit].mean()
                row[f"{metric}_peak"] = normalized[unit].max()
                row[f"{metric}_pooled"] = scores[unit].mean()
            rows.append(row)
    return pd.DataFrame(rows)


def random_units(shape: ModelShape = TINY_SHAPE, sources: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per_source, weight = {}, {}
    for layer in range(shape.num_layers):
        for kind, n in (("mlp", shape.intermediate), ("attn", shape.heads)):
            base = rng.lognormal(0.0, 1.0, size=(n, 1))
            per_source[(layer, kind)] = base * rng.lognormal(0.0, 0.5, size=(n, sources))
            weight[(layer, kind)] = rng.lognormal(0.0, 0.3, size=n)
    return units_table(per_source, weight)


def nan_model(family: str = "llama"):
    """(tiny model, adapter) whose layer 1 MLP input projection has one NaN weight, so the
    input of layer 1's MLP output projection carries NaN."""
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        adapter.mlp_inputs(adapter.decoder_layers(model)[1])[0].weight[3, 5] = float("nan")
    return model, adapter


def no_hooks(model) -> bool:
    """Whether no forward (pre-)hook is left on any module of ``model``."""
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def synthetic_grams(shape: ModelShape):
    """(layer, kind) -> a synthetic normalized Gram (d+1, d+1) of 64 random [x, 1] rows,
    the same for the same (layer, kind) (memoized)."""
    import functools

    sizes = {"mlp": shape.intermediate, "attn": shape.heads * shape.head_dim}

    @functools.lru_cache(maxsize=None)
    def gram_of(layer: int, kind: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(layer * 2 + (kind == "mlp"))
        x = torch.cat([torch.randn(64, sizes[kind], generator=gen, dtype=torch.float64),
                       torch.ones(64, 1, dtype=torch.float64)], 1)                  # (64, d+1)
        return x.T @ x / 64
    return gram_of
