"""Config of the ``speed`` stage: the throughput probe (why it is off by default: see
``gprune.configs.evaluate``)."""
from __future__ import annotations

from pydantic import Field

from gprune.configs.evaluate import EvalStageConfig


class SpeedConfig(EvalStageConfig):
    """Prefill of ``prefill_tokens`` tokens (cut to the model's context length) and
    ``decode_tokens`` greedy decode steps at batch 1, median of ``repeats`` after one
    untimed warm-up; a pruned checkpoint is timed interleaved with its dense source model
    (``gprune.maths.evaluate.measure_speeds``), which adds the speedup rows."""

    prefill_tokens: int = Field(512, ge=2, le=131072, description="tokens per prefill probe")
    decode_tokens: int = Field(16, ge=1, le=4096, description="tokens per decode probe")
    repeats: int = Field(3, ge=1, le=100, description="timed repeats (median reported)")
