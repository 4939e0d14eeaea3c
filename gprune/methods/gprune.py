"""GPrune-LLM: generalization-aware structured pruning (arXiv 2603.13418; METHOD.md).

Units are partitioned per layer into behaviour-consistent modules (K-means over their
per-source ranks, sensitivity and magnitude), scored inside their module by the
activation metric averaged over sources (layer-normalized, so no source dominates),
with a reliability gate that falls back to weight scores for modules whose activation
signal is both unstable across sources and weak; allocation by a learned path of
keep fractions (one learning run serves every target), kept only when, refit by least
squares, it is no worse in KL to dense on held-apart calibration tokens than the uniform
MLP-only plan (``kl_check``; docs/METHOD_NOTES.md). Ablations are parameters:
``gprune:k=1`` (no partition), ``gprune:gate=false``, ``gprune:allocator=uniform``,
``gprune:kl_check=false``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from gprune.configs.partition import PartitionConfig
from gprune.configs.surgery import Reconstruct
from gprune.methods.allocators import AllocatorName
from gprune.methods.base import Method, ReconstructionParams, reconstruct_field
from gprune.methods.importance import CriterionName, importance, signal_of


class GpruneParams(ReconstructionParams):
    k: int = Field(4, ge=1, description="modules per layer (1: no partition)")
    metric: CriterionName = Field("wanda_sp", description="importance criterion (gprune.methods.importance)")
    aggregate: Literal["normalized_mean", "pooled", "peak"] = Field(
        "normalized_mean", description="over sources: mean of layer-normalized scores, pooled, "
        "or peak (largest layer-normalized per-source score)")
    gate: bool = Field(True, description="reliability gate (needs >= 2 calibration sources)")
    q_sigma: float = Field(0.75, gt=0, lt=1, description="gate: sensitivity quantile")
    q_m: float = Field(0.25, gt=0, lt=1, description="gate: magnitude quantile")
    heads: bool = Field(True, description="may remove attention heads (false: MLP channels "
                        "only, every head kept, whatever the run's --prune-attention)")
    allocator: AllocatorName = Field("learned_path", description="gprune.methods.allocators name")
    reconstruct: Reconstruct = reconstruct_field("lsq")
    kl_check: bool = Field(True, description="keep the uniform MLP-only plan (same refit) "
                           "when the allocator's plan has a higher KL to dense on held-apart "
                           "calibration tokens (allocate stage; needs reconstruct=lsq)")


class Gprune(Method):
    name = "gprune"
    summary = "GPrune-LLM: partitioned, reliability-gated scores, learned path allocation"
    Params = GpruneParams

    def partition_config(self) -> PartitionConfig:
        return PartitionConfig(k=self.params.k, metric=signal_of(self.params.metric))

    def score_settings(self) -> dict:
        p = self.params
        return {"metric": p.metric, "aggregate": p.aggregate, "gate": p.gate,
                "q_sigma": p.q_sigma, "q_m": p.q_m}

    @property
    def needs_sources(self) -> int:
        return 2 if self.params.gate and importance(self.params.metric).uses_activations else 1
