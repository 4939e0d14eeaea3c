"""Config of the capture stage (METHOD.md stage 1): one calibration pass over one source."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class CalibrationPass(StageConfig):
    """Which calibration tokens run through the dense model, and where: the fields the
    capture and the gram stages share, so with equal values both see the same tokens.

    ``device``, ``batch_size`` and ``stream`` are execution settings: they do not change the
    statistics (beyond float rounding), so ``device`` and ``stream`` are left out of the
    artifact key (a streamed pass gives what the in-memory one gives: tests/test_streaming.py).
    """

    source: str = Field(min_length=1, description="name of the calibration source (a label)")
    n_sequences: int = Field(32, gt=0, description="sequences sampled from the source")
    seq_len: int = Field(512, gt=0, description="tokens per sequence")
    batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    seed: int = Field(0, ge=0, description="seed of the sequence sampler")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="layer-streamed pass, one decoder layer's weights on the device at "
                            "a time (docs/SCALE.md); auto: when the weights do not fit the "
                            "device's free memory")

    @field_validator("source")
    @classmethod
    def _source_is_a_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source must be a non-blank name, e.g. 'wiki'")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    def params(self) -> dict[str, Any]:
        """Key parameters: everything except the device the pass ran on and how."""
        params = super().params()
        params.pop("device")
        params.pop("stream")
        return params

    @property
    def requested_tokens(self) -> int:
        return self.n_sequences * self.seq_len


class CaptureConfig(CalibrationPass):
    """A calibration pass and how the capture statistics are defined."""

    tau_act: float = Field(0.5, gt=0, allow_inf_nan=False,
                           description="a channel is active at a token when |x_c| > tau_act * "
                                       "RMS over the channels of that input vector")
