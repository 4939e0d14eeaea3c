"""Config of the contexts stage (FANG, arXiv 2512.23014): which calibration tokens are
sampled at every layer's MLP input, and how they are reduced and clustered.

The token selection per source is the capture's (``CalibrationPass`` fields, one value for
every source); ``sample_tokens`` of the pass's real tokens (split evenly over the sources,
the same positions in every layer) are kept, reduced by PCA to ``pca_dim`` and clustered
into ``k`` context types. One contexts artifact serves every method variant and target.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from gprune.configs.base import StageConfig
from gprune.configs.capture import CaptureConfig


class ContextsConfig(StageConfig):
    sources: tuple[str, ...] = Field(min_length=1, description="calibration sources, in order")
    n_sequences: int = Field(32, gt=0, description="sequences sampled from each source")
    seq_len: int = Field(512, gt=0, description="tokens per sequence")
    batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    seed: int = Field(0, ge=0, description="seed of the sequence and token samplers, k-means")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    k: int = Field(7, ge=1, description="context types per layer (the paper's 7)")
    pca_dim: int = Field(64, ge=1, description="PCA dimension of the MLP inputs (the paper's 64)")
    sample_tokens: int = Field(2048, ge=16, description="tokens sampled per layer (all sources)")
    kmeans_iters: int = Field(50, ge=1, description="Lloyd iterations at most")

    @model_validator(mode="after")
    def _fits(self):
        from gprune.maths.contexts import check_sample

        check_sample(self.k, self.pca_dim, self.sample_tokens)
        return self

    @classmethod
    def from_captures(cls, captures: list[CaptureConfig], **values) -> "ContextsConfig":
        """The contexts config over ``captures``' tokens (their shared token settings)."""
        first = captures[0]
        return cls.build(sources=tuple(c.source for c in captures),
                         n_sequences=first.n_sequences, seq_len=first.seq_len,
                         batch_size=first.batch_size, seed=first.seed, device=first.device,
                         **values)

    def params(self):
        params = super().params()
        params.pop("device")
        return params
