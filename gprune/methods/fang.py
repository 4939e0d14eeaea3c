"""FANG: function-aware neuron grouping (Ren et al., AAAI 2026, arXiv 2512.23014; reference
code tianjinren/FANG, read for its constants).

Statistics (the ``contexts`` stage, ``tasks.contexts``): a sample of every layer's
MLP-input tokens, PCA to ``pca_dim`` (64), k-means into ``k`` (7) context types; one
artifact serves every target and both variants. Scores (pure, ``gprune.maths.fang``): each
MLP channel's association with each context (an activation-only proxy of the reference's
activation x gradient score), K + 1 equal-size groups (a shared group of channels that
serve many contexts, then a linear assignment), and inside each group the base metric with
tokens weighted by alpha = softmax(-distance / tau) to the group's context: FLAP's
fluctuation (``fang_flap``, F-FANG) or the OBS criterion on the weighted Gram (``fang_obc``,
O-FANG). Each group is pruned separately (groups are the plan's modules). Allocation
(``fang`` allocator): block sparsity from functional complexity, 1 - E[cos(X_l, X_l+1)]
(the capture's per-layer cosine), in [0.5 S, 1.5 S] renormalized to the budget; the shared
group keeps at least ``shared_floor`` (1: exempt, as the reference's residual expert).
Heads: the reference prunes them with its base method, ungrouped, at the block's sparsity;
here both variants rank them by FLAP's standardized head score (``heads=false`` keeps them).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from gprune.configs.surgery import Reconstruct
from gprune.maths.score import heads_by_standardized
from gprune.maths.stats import scaled_rank
from gprune.methods.allocators import AllocatorName
from gprune.methods.base import Method, ReconstructionParams, reconstruct_field

Variant = Literal["flap", "obc"]


class FangParams(ReconstructionParams):
    variant: Variant = Field("flap", description="in-group metric: flap (F-FANG) or obc (O-FANG)")
    k: int = Field(7, ge=1, le=64, description="context types per layer (paper: 7)")
    pca_dim: int = Field(64, ge=1, description="PCA dimension of the MLP-input tokens (paper: 64)")
    sample_tokens: int = Field(2048, ge=16, description="calibration tokens sampled per layer")
    tau: float = Field(0.5, gt=0, description="token weight temperature: alpha = "
                       "softmax(-distance / tau), distances divided by their layer mean")
    shared: bool = Field(True, description="a shared group of channels serving many contexts")
    shared_floor: float = Field(1.0, ge=0, le=1, description="keep fraction the shared group "
                                "never goes below (1: exempt from pruning)")
    spread: float = Field(0.5, ge=0, lt=1, description="block sparsity in [(1-spread) S, "
                          "(1+spread) S] by functional complexity (0: uniform)")
    heads: bool = Field(True, description="may remove attention heads (FLAP's head score)")
    allocator: AllocatorName = Field("fang", description="gprune.methods.allocators name")
    reconstruct: Reconstruct = reconstruct_field("bias")


class FangObcParams(FangParams):
    variant: Variant = Field("obc", description="in-group metric: flap (F-FANG) or obc (O-FANG)")
    reconstruct: Reconstruct = reconstruct_field("lsq")


class Fang(Method):
    name = "fang"
    summary = "FANG: context groups, token-weighted in-group scores, FC block sparsity"
    Params = FangParams
    needs = frozenset({"moments", "weights", "contexts"})

    def __init__(self, **params):
        super().__init__(**params)
        from gprune.maths.contexts import check_sample

        check_sample(self.params.k, self.params.pca_dim, self.params.sample_tokens)

    def contexts_settings(self) -> dict:
        """The contexts stage's parameters (``ContextsConfig``) this method reads."""
        p = self.params
        return {"k": p.k, "pca_dim": p.pca_dim, "sample_tokens": p.sample_tokens}

    def score_settings(self) -> dict:
        p = self.params
        return {"variant": p.variant, "tau": p.tau, "shared": p.shared,
                "shared_floor": p.shared_floor, "spread": p.spread}

    @classmethod
    def score_units(cls, units, modules_of_units, contexts=None, layers=None, *,
                    variant, tau, shared, shared_floor, spread):
        """FLAP's scores for heads; every MLP channel scored inside its FANG group
        (``contexts``: the contexts artifact's layers; ``layers``: the stats' cosine)."""
        from gprune.maths.fang import layer_groups

        if contexts is None or layers is None:
            from gprune.errors import ConfigError
            raise ConfigError("fang scores need the contexts artifact and the per-layer "
                              "cosine: run the contexts stage (the flow does)")
        scores, _ = super().score_units(units, modules_of_units, metric="flap",
                                        aggregate="pooled", gate=False)
        scores = heads_by_standardized(scores)
        cosine = layers.set_index("layer").cosine
        mlp = scores.kind == "mlp"
        for layer, ctx in enumerate(contexts):
            groups, raw = layer_groups(ctx, tau, shared, variant)            # (C,), (C,)
            rows = mlp & (scores.layer == layer)
            unit = scores.loc[rows, "unit"].to_numpy()
            scores.loc[rows, "module"] = groups[unit].astype(scores.module.dtype)
            scores.loc[rows, "raw"] = raw[unit]
        scores.loc[mlp, "z"] = np.nan
        scores["score"] = scores.groupby(["layer", "kind", "module"]).raw.transform(scaled_rank)
        scores["fc"] = 1.0 - scores.layer.map(cosine).to_numpy(dtype=float)
        scores["spread"], scores["floor"] = spread, shared_floor if shared else 0.0
        modules = scores.groupby(["layer", "kind", "module"]).size().rename("size").reset_index()
        modules["metric_used"], modules["reason"] = "activation", "fang group"
        return scores, modules


class FangFlap(Fang):
    name = "fang_flap"
    summary = "F-FANG: FANG with FLAP's fluctuation inside each group, bias compensation"


class FangObc(Fang):
    name = "fang_obc"
    summary = "O-FANG: FANG with the OBS criterion on each group's weighted Gram, lsq refit"
    Params = FangObcParams


__all__ = ["Fang", "FangFlap", "FangObc"]
