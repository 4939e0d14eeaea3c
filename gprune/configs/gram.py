"""Config of the gram stage: the Gram matrices of one source's calibration tokens.

A gram artifact is the companion of a capture artifact: its token selection (source,
n_sequences, seq_len, batch_size, seed, device) is CaptureConfig's: both derive from
``CalibrationPass``, so with equal values both stages see exactly the same
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

from typing import Any, Literal

from pydantic import Field

from gprune.configs.capture import CalibrationPass, CaptureConfig

StorageDtype = Literal["float32", "float64"]
TOKEN_FIELDS = tuple(CalibrationPass.model_fields)


class GramConfig(CalibrationPass):
    """A calibration pass (as capture's, field for field) and how to store the Grams."""

    storage_dtype: StorageDtype = Field(
        "float32", description="dtype of the stored Grams (accumulation is always float64): "
                               "float32 halves the disk, float64 keeps every bit")

    @classmethod
    def from_capture(cls, capture: CaptureConfig, **overrides: Any) -> "GramConfig":
        """The gram config that sees exactly ``capture``'s calibration tokens."""
        values = {name: getattr(capture, name) for name in TOKEN_FIELDS}
        return cls.build(**{**values, **overrides})
