"""Config of the ``choice`` stage: multiple-choice tasks and budget (sizing advice in
``gprune.configs.evaluate``)."""
from __future__ import annotations

from pydantic import Field, field_validator

from gprune.configs.evaluate import EvalStageConfig


class ChoiceConfig(EvalStageConfig):
    """The first ``mc_limit`` valid examples of each task, zero-shot, scored by lm-eval
    through ``gprune.eval.shared_context.SharedContextHFLM`` (each question's context
    computed once for all of its options, ``mc_batch_size`` contexts per pass)."""

    mc_tasks: tuple[str, ...] = Field(
        ("mmlu_local", "siqa_local"), min_length=1,
        description="local task names, paths to .jsonl files {query, choices, gold}, "
                    "or lm-eval task names (need the Hugging Face Hub)")
    mc_limit: int = Field(50, ge=1, le=1_000_000, description="examples per task (first N)")
    mc_batch_size: int = Field(16, ge=1, le=4096,
                               description="multiple choice: contexts (of equal token length) "
                                           "per forward pass, each with all its continuations")

    @field_validator("mc_tasks")
    @classmethod
    def _tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(t.strip() for t in tasks)
        if any(not t for t in cleaned):
            raise ValueError("task names must be non-empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("task names must be unique")
        return cleaned
