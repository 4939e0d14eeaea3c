"""Configuration of the surgery stage (stage 6: slice the model to a plan, save it)."""
from __future__ import annotations

from typing import Any, Literal

import torch

from gprune.configs.base import StageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SurgeryConfig(StageConfig):
    """bias_compensation: fold the removed channels' mean contribution into the output
    biases (FLAP); needs a stats artifact. A plan whose ``bias_compensation`` is true turns
    it on as well. device: where the slicing runs ("auto" = cuda when present); it does not
    enter the artifact key. dtype: the dtype the model is loaded, sliced and saved in."""

    bias_compensation: bool = False
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def params(self) -> dict[str, Any]:
        """Key parameters: the device only decides where the work runs."""
        return self.model_dump(mode="json", exclude={"device"})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
