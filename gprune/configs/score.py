"""Config of the scoring stage (METHOD.md stage 4): which method scores, with what settings.

``settings`` are the method's ``score_settings()`` (for the built-in methods: the
importance criterion, aggregation over sources, the reliability gate and its
quantiles); the stage calls ``score_units`` of the registered method ``method``.
"""
from typing import Any

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class ScoreConfig(StageConfig):
    method: str = Field("gprune", description="registered method whose score_units runs")
    settings: dict[str, Any] = Field(default_factory=dict, description="its score settings")

    @field_validator("method")
    @classmethod
    def _known(cls, name: str) -> str:
        from gprune.methods.registry import method_class

        method_class(name)
        return name
