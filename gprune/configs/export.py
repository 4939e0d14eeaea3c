"""Config of the ``export`` stage: a surgery checkpoint as a llama.cpp GGUF file."""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from gprune.configs.base import StageConfig

Outtype = Literal["f32", "f16", "q8_0"]    # the GGUF tensor types gprune writes
OUTTYPES: tuple[str, ...] = get_args(Outtype)


class ExportConfig(StageConfig):
    """``outtype``: f32 (exact, the checkpoint's widths), f16 (half the size; 1-D tensors
    stay f32) or q8_0 (8-bit blocks of 32); f16 and q8_0 zero-pad MLP widths to multiples
    of 32 (exact; ggml's fast matmuls need them)."""

    outtype: Outtype = Field("f16", description="GGUF tensor type")
