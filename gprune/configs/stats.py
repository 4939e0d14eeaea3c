"""Config of the stats stage (METHOD.md stage 2): per-unit metrics, ranks and sensitivity."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig

Metric = Literal["wanda_sp", "flap"]
METRICS: tuple[str, ...] = ("wanda_sp", "flap")


class StatsConfig(StageConfig):
    """Which activation metrics get per-source scores, ranks, sensitivity and magnitude.

    ``units.parquet`` holds the five ``<metric>*`` columns for every metric listed here
    (both by default; later stages read ``wanda_sp`` and ``flap``).
    """

    metrics: tuple[Metric, ...] = Field(METRICS, description="activation metrics to compute")

    @field_validator("metrics")
    @classmethod
    def _non_empty_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("metrics must name at least one of wanda_sp, flap")
        if len(set(value)) != len(value):
            raise ValueError("metrics must not repeat a metric")
        return value
