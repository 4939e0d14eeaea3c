"""Wanda-sp: structured Wanda, RMS(x_c) * mean_i |W_out[i, c]| from pooled statistics,
the same keep fraction in every layer (An et al. 2024, arXiv 2312.11983, as a baseline)."""
from __future__ import annotations

from pydantic import Field

from gprune.configs.surgery import Reconstruct
from gprune.methods.allocators import AllocatorName
from gprune.methods.base import Method, ReconstructionParams, reconstruct_field


class UniformParams(ReconstructionParams):
    allocator: AllocatorName = Field("uniform", description="gprune.methods.allocators name")
    reconstruct: Reconstruct = reconstruct_field("none")


class WandaSp(Method):
    name = "wanda_sp"
    summary = "Wanda-sp: activation RMS x weight, uniform per layer"
    Params = UniformParams

    def score_settings(self) -> dict:
        return {"metric": "wanda_sp", "aggregate": "pooled", "gate": False}
