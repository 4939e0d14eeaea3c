"""Config of the reliability-gated scoring stage (METHOD.md stage 4)."""
from typing import Literal

from pydantic import Field

from gprune.configs.base import StageConfig


class ScoreConfig(StageConfig):
    metric: Literal["wanda_sp", "flap", "weight"] = "wanda_sp"
    aggregate: Literal["normalized_mean", "pooled"] = "normalized_mean"
    gate: bool = True
    q_sigma: float = Field(0.75, gt=0, lt=1)
    q_m: float = Field(0.25, gt=0, lt=1)
