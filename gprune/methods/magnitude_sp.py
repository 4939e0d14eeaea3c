"""Magnitude: weight norms only (no activations), the same keep fraction in every layer."""
from __future__ import annotations

from gprune.methods.base import Method
from gprune.methods.wanda_sp import UniformParams


class MagnitudeSp(Method):
    name = "magnitude_sp"
    summary = "magnitude: weight norms, uniform per layer"
    Params = UniformParams
    needs = frozenset({"weights"})

    def score_settings(self) -> dict:
        return {"metric": "weight", "aggregate": "pooled", "gate": False}
