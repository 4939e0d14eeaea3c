"""Config of the gram stage: the Gram matrices of one source's calibration tokens.

A gram artifact is the companion of a capture artifact: its token selection (source,
n_sequences, seq_len, batch_size, seed, device) is CaptureConfig's, field for field (the
same definitions and validators), so with equal values both stages see exactly the same
calibration tokens (``GramConfig.from_capture``). Accumulation is always float64; only the
storage on disk is a choice.

``storage_dtype`` default ``float32``: storing rounds each entry to 2^-24 relative
(~6e-8), four orders of magnitude below the lsq ridge (1e-2 of the mean diagonal) and the
sampling noise of a few thousand calibration tokens, and halves the disk (SmolLM2-135M:
324 MB per source instead of 647 MB; a 7B Llama: 17.7 GB instead of 35.3 GB). Token
counts stay exact in float32 up to 2^24 tokens per source (the manifest keeps the exact
count either way). ``float64`` stores the accumulator bit for bit.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig
from gprune.configs.capture import CaptureConfig

StorageDtype = Literal["float32", "float64"]
TOKEN_FIELDS = ("source", "n_sequences", "seq_len", "batch_size", "seed", "device")
_CAPTURE = CaptureConfig.model_fields


def _same(name: str):
    """CaptureConfig's definition of a token-selection field (type, default, bounds, help)."""
    return copy.copy(_CAPTURE[name])


class GramConfig(StageConfig):
    """What to run through the dense model (as capture) and how to store the Grams.

    ``device`` is an execution setting, left out of the artifact key (as in capture).
    """

    source: str = _same("source")
    n_sequences: int = _same("n_sequences")
    seq_len: int = _same("seq_len")
    batch_size: int = _same("batch_size")
    seed: int = _same("seed")
    device: str = _same("device")
    storage_dtype: StorageDtype = Field(
        "float32", description="dtype of the stored Grams (accumulation is always float64): "
                               "float32 halves the disk, float64 keeps every bit")

    _source_is_a_name = field_validator("source")(CaptureConfig._source_is_a_name.__func__)
    _known_device = field_validator("device")(CaptureConfig._known_device.__func__)

    @classmethod
    def from_capture(cls, capture: CaptureConfig, **overrides: Any) -> "GramConfig":
        """The gram config that sees exactly ``capture``'s calibration tokens."""
        values = {name: getattr(capture, name) for name in TOKEN_FIELDS}
        return cls.build(**{**values, **overrides})

    def params(self) -> dict[str, Any]:
        """Key parameters: everything except the device the pass ran on."""
        params = super().params()
        params.pop("device")
        return params

    @property
    def requested_tokens(self) -> int:
        return self.n_sequences * self.seq_len
