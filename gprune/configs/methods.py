"""Pruning methods by name: which partition, score and allocation settings each one uses.

Method knowledge is data: ``gprune`` and its ablations, and the baselines
``flap``, ``wanda_sp`` and ``magnitude_sp`` (METHOD.md "Baselines") all run over
the same captured statistics and differ only in these settings.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from gprune.configs.base import StageConfig
from gprune.configs.partition import PartitionConfig
from gprune.configs.score import ScoreConfig
from gprune.errors import ConfigError

PRESETS: dict[str, dict] = {
    "gprune": dict(k=4, metric="wanda_sp", aggregate="normalized_mean", gate=True,
                   allocator="learned_path", bias_compensation=False),
    "flap": dict(k=1, metric="flap", aggregate="pooled", gate=False, allocator="flap",
                 bias_compensation=True),
    "wanda_sp": dict(k=1, metric="wanda_sp", aggregate="pooled", gate=False, allocator="uniform",
                     bias_compensation=False),
    "magnitude_sp": dict(k=1, metric="weight", aggregate="pooled", gate=False, allocator="uniform",
                         bias_compensation=False),
}


class MethodConfig(StageConfig):
    """A method preset plus ablation switches (None keeps the preset's value)."""

    name: str = "gprune"
    no_partition: bool = False
    no_gate: bool = False
    allocator: Optional[Literal["learned_path", "learned", "uniform", "flap"]] = None
    k: Optional[int] = Field(None, ge=1)
    metric: Optional[Literal["wanda_sp", "flap"]] = None
    bias_compensation: Optional[bool] = None

    def model_post_init(self, _context) -> None:
        if self.name not in PRESETS:
            raise ConfigError(f"unknown method {self.name!r}; known methods: {', '.join(PRESETS)}")

    def settings(self) -> dict:
        preset = dict(PRESETS[self.name])
        if self.k is not None:
            preset["k"] = self.k
        if self.no_partition:
            preset["k"] = 1
        if self.no_gate:
            preset["gate"] = False
        for name in ("allocator", "metric", "bias_compensation"):
            if getattr(self, name) is not None:
                preset[name] = getattr(self, name)
        return preset

    @property
    def label(self) -> str:
        """A readable name for tables: the preset plus what was changed."""
        parts = [self.name]
        parts += [flag.replace("_", "-") for flag in ("no_partition", "no_gate") if getattr(self, flag)]
        parts += [f"{n}={getattr(self, n)}" for n in ("allocator", "k", "metric", "bias_compensation")
                  if getattr(self, n) is not None]
        return "+".join(parts)

    @property
    def needs_sensitivity(self) -> bool:
        return self.settings()["gate"]

    def partition_config(self) -> PartitionConfig:
        s = self.settings()
        return PartitionConfig(k=s["k"], metric=s["metric"] if s["metric"] != "weight" else "wanda_sp")

    def score_config(self) -> ScoreConfig:
        s = self.settings()
        return ScoreConfig(metric=s["metric"], aggregate=s["aggregate"], gate=s["gate"])
