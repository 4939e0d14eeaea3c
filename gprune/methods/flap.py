"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

Score: the fluctuation Var[x_c] * ||W_out[:, c]||^2 from the pooled calibration
statistics; allocation: one global threshold over standardized scores (layers keep
what they score); reconstruction: bias compensation (the removed channels' mean
contribution moves into the output projection's bias).
"""
from __future__ import annotations

from pydantic import Field

from gprune.methods.allocators import AllocatorName
from gprune.methods.base import Method, MethodParams


class FlapParams(MethodParams):
    allocator: AllocatorName = Field("flap", description="gprune.methods.allocators name")
    bias_compensation: bool = Field(True, description="FLAP's bias compensation")


class Flap(Method):
    name = "flap"
    summary = "FLAP: fluctuation metric, global threshold, bias compensation"
    Params = FlapParams

    def score_settings(self) -> dict:
        return {"metric": "flap", "aggregate": "pooled", "gate": False}
