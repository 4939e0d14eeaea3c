"""Config of the partition stage (METHOD.md stage 3)."""
from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class PartitionConfig(StageConfig):
    k: int = Field(4, ge=1, description="modules per layer (K=1: no partition)")
    metric: str = Field("wanda_sp", description="activation criterion whose columns are clustered")
    seed: int = 0
    n_init: int = Field(10, ge=1)

    @field_validator("metric")
    @classmethod
    def _activation(cls, name: str) -> str:
        from gprune.methods.importance import activation_criteria

        if name not in activation_criteria():
            raise ValueError(f"must be an activation criterion: {', '.join(activation_criteria())}")
        return name
