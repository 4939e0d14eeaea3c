"""Config of the allocation stage: the only stage that depends on the target sparsity."""
from typing import Literal

from pydantic import Field, model_validator

from gprune.configs.base import StageConfig


class AllocateConfig(StageConfig):
    sparsity: float = Field(..., gt=0, lt=1, description="fraction of prunable parameters removed")
    allocator: Literal["learned", "uniform", "flap"] = "learned"
    prune_attention: bool = True
    mlp_floor: float = Field(0.1, gt=0, le=1, description="min fraction of MLP channels per layer")
    # learned allocator
    steps: int = Field(30, ge=1)
    lr: float = Field(0.1, gt=0)
    penalty: float = Field(50.0, gt=0)
    t_start: float = Field(0.05, gt=0)
    t_end: float = Field(0.01, gt=0)
    n_sequences: int = Field(8, ge=1, description="calibration sequences for the KL objective")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(2, ge=1)
    seed: int = 0
    device: str = "auto"

    @model_validator(mode="after")
    def _temperatures(self):
        if self.t_end > self.t_start:
            raise ValueError("t_end must not exceed t_start (the temperature anneals down)")
        return self

    def key_params(self) -> dict:
        """Parameters that shape the plan (device does not)."""
        params = self.params()
        params.pop("device")
        if self.allocator != "learned":
            for name in ("steps", "lr", "penalty", "t_start", "t_end", "n_sequences",
                         "seq_len", "batch_size"):
                params.pop(name)
        return params
