"""Config of the partition stage (METHOD.md stage 3)."""
from typing import Literal

from pydantic import Field

from gprune.configs.base import StageConfig


class PartitionConfig(StageConfig):
    k: int = Field(4, ge=1, description="modules per layer (K=1: no partition)")
    metric: Literal["wanda_sp", "flap"] = "wanda_sp"
    seed: int = 0
    n_init: int = Field(10, ge=1)
