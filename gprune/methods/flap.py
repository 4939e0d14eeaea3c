"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

Score: the fluctuation Var[x_c] * ||W_out[:, c]||^2 from the pooled calibration
statistics; allocation: one global threshold over standardized scores (layers keep
what they score); reconstruction: bias compensation (the removed channels' mean
contribution moves into the output projection's bias). Heads follow the reference code's
AL-AM structure: each attention channel's fluctuation squared, standardized over the
layer's H * head_dim channels, averaged per head; that score both enters the threshold
and picks the heads a layer keeps.
"""
from __future__ import annotations

from pydantic import Field

from gprune.configs.surgery import Reconstruct
from gprune.maths.score import heads_by_standardized
from gprune.methods.allocators import AllocatorName
from gprune.methods.base import Method, ReconstructionParams, reconstruct_field


class FlapParams(ReconstructionParams):
    allocator: AllocatorName = Field("flap", description="gprune.methods.allocators name")
    reconstruct: Reconstruct = reconstruct_field("bias")


class Flap(Method):
    name = "flap"
    summary = "FLAP: fluctuation metric, global threshold, bias compensation"
    Params = FlapParams

    def score_settings(self) -> dict:
        return {"metric": "flap", "aggregate": "pooled", "gate": False}

    @classmethod
    def score_units(cls, units, modules_of_units, **settings):
        """The default scores, heads ranked by FLAP's standardized head score."""
        scores, modules = super().score_units(units, modules_of_units, **settings)
        return heads_by_standardized(scores), modules
