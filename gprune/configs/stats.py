"""Config of the stats stage (METHOD.md stage 2): per-unit metrics, ranks and sensitivity."""
from __future__ import annotations

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig
from gprune.methods.importance import activation_criteria, importance


class StatsConfig(StageConfig):
    """Which activation criteria get per-source scores, ranks, sensitivity and magnitude.

    ``units.parquet`` holds the five ``<criterion>*`` columns for every criterion listed
    here (default: every activation criterion of ``gprune.methods.importance``).
    """

    metrics: tuple[str, ...] = Field(default_factory=activation_criteria,
                                     description="activation criteria to compute")

    @field_validator("metrics")
    @classmethod
    def _known_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"metrics must name at least one of {', '.join(activation_criteria())}")
        if len(set(value)) != len(value):
            raise ValueError("metrics must not repeat a metric")
        for name in value:
            if not importance(name).uses_activations:
                raise ValueError(f"{name} is not an activation criterion; "
                                 f"choose from {', '.join(activation_criteria())}")
        return value

    def channel_metrics(self) -> dict:
        """criterion name -> its per-channel score function (for the stats maths)."""
        return {name: importance(name).channels for name in self.metrics}
