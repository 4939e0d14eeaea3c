"""GPrune-LLM: generalization-aware structured pruning (arXiv 2603.13418; METHOD.md).

As this project reads it after measuring it (docs/METHOD_NOTES.md, issue 15): each unit is
scored by its *peak* over the calibration sources of its layer-normalized activation
metric (a channel that one source needs is not averaged away by the others); attention
heads are kept (``heads=false``: removing them cost the never-seen domains far more than
any calibration objective showed); MLP keep fractions per layer come from a learned path
(one learning run serves every target), kept only when, refit by least squares, it is no
worse in KL to dense on held-apart calibration tokens than the uniform MLP-only plan
(``kl_check``), after each layer's count has moved by one first-order step of the refit
model's calibration KL (``refine``, ``gprune.maths.refine``). METHOD.md's partition
into K behaviour-consistent modules and its reliability gate remain parameters
(``gprune:k=4,gate=true,aggregate=normalized_mean`` is the paper's reading): on SmolLM2
the partition made held-out perplexity worse and the gate switched no module. Ablations:
``gprune:k=4``, ``gprune:gate=true``, ``gprune:heads=true``, ``gprune:allocator=uniform``,
``gprune:kl_check=false``, ``gprune:refine=0``.
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
    k: int = Field(1, ge=1, description="modules per layer (1: no partition; K>1, "
                   "METHOD.md's 4, measured worse: docs/METHOD_NOTES.md)")
    metric: CriterionName = Field("wanda_sp", description="importance criterion (gprune.methods.importance)")
    aggregate: Literal["normalized_mean", "pooled", "peak"] = Field(
        "peak", description="over sources: mean of layer-normalized scores, pooled, "
        "or peak (largest layer-normalized per-source score)")
    gate: bool = Field(False, description="reliability gate (needs >= 2 calibration "
                       "sources; measured neutral on SmolLM2, where it switches no module)")
    q_sigma: float = Field(0.75, gt=0, lt=1, description="gate: sensitivity quantile")
    q_m: float = Field(0.25, gt=0, lt=1, description="gate: magnitude quantile")
    heads: bool = Field(False, description="may remove attention heads (false: MLP channels "
                        "only, every head kept, whatever the run's --prune-attention)")
    allocator: AllocatorName = Field("learned_path", description="gprune.methods.allocators name")
    reconstruct: Reconstruct = reconstruct_field("lsq")
    kl_check: bool = Field(True, description="keep the uniform MLP-only plan (same refit) "
                           "when the allocator's plan has a higher KL to dense on held-apart "
                           "calibration tokens (allocate stage; needs reconstruct=lsq)")
    refine: int = Field(1, ge=0, le=8, description="first-order steps moving each layer's "
                        "MLP channel count by the refit model's calibration KL before the "
                        "kl_check (gprune.maths.refine; with the learned path once per grid "
                        "point in the path stage, about 90 s of a 2-core CPU for SmolLM2; "
                        "measured 1-2% better held-out: docs/METHOD_NOTES.md); 0: off. Used "
                        "with kl_check, heads=false and k=1 only")


class Gprune(Method):
    name = "gprune"
    summary = "GPrune-LLM: peak-over-sources scores, heads kept, learned path, lsq refit"
    Params = GpruneParams

    @property
    def refine_steps(self) -> int:
        """``refine`` where it applies: with the kl_check, every head kept, one module a layer."""
        p = self.params
        return p.refine if p.kl_check and not p.heads and p.k == 1 else 0

    def partition_config(self) -> PartitionConfig:
        return PartitionConfig(k=self.params.k, metric=signal_of(self.params.metric))

    def score_settings(self) -> dict:
        p = self.params
        return {"metric": p.metric, "aggregate": p.aggregate, "gate": p.gate,
                "q_sigma": p.q_sigma, "q_m": p.q_m}

    @property
    def needs_sources(self) -> int:
        return 2 if self.params.gate and importance(self.params.metric).uses_activations else 1
