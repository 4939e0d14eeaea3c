"""Configuration of the surgery stage (stage 6: slice the model to a plan, save it)."""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from pydantic import Field

from gprune.configs.base import StageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Reconstruct = Literal["none", "bias", "lsq"]


class SurgeryConfig(StageConfig):
    """reconstruct: how each output projection recovers what its removed input channels
    contributed (``gprune.maths.refit``): none, bias (FLAP's bias compensation; needs a
    stats artifact) or lsq (least-squares refit of the kept columns and the bias; needs
    the gram artifacts of the calibration sources); None: the plan's (its method's)
    choice. ridge: lsq damping, relative to the kept Gram's mean diagonal. device: where
    the slicing runs ("auto" = cuda when present); it does not enter the artifact key.
    dtype: the dtype the model is loaded, sliced and saved in."""

    reconstruct: Optional[Reconstruct] = None
    ridge: float = Field(1e-3, gt=0, le=10)
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="layer-streamed surgery, one decoder layer's weights in memory at "
        "a time, the checkpoint written a layer per shard (auto: when the model does not "
        "fit; docs/SCALE.md); not in the key")

    def params(self) -> dict[str, Any]:
        """Key parameters: the device and the streaming only decide how the work runs."""
        return self.model_dump(mode="json", exclude={"device", "stream"})

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
