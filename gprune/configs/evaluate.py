"""Config of the ``evaluate`` stage: budgets for perplexity, multiple choice and speed.

Defaults are CPU-friendly: 4096 held-out tokens per corpus source (8 windows of 512
tokens), 200 examples per multiple-choice task, a short speed probe.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class EvalConfig(StageConfig):
    """Budgets of one evaluation.

    Perplexity: per corpus source, ``ceil(ppl_tokens / seq_len)`` windows of ``seq_len``
    tokens drawn from the held-out split (``gprune.data.corpus.sample_sequences`` with
    ``seed``); ``seq_len`` is cut to the model's context length when longer. Multiple
    choice: the first ``mc_limit`` valid examples of each task, zero-shot.
    """

    ppl_tokens: int = Field(4096, ge=2, le=10_000_000,
                            description="held-out tokens per corpus source (perplexity budget)")
    seq_len: int = Field(512, ge=2, le=131072, description="tokens per perplexity window")
    mc_tasks: tuple[str, ...] = Field(
        ("mmlu_local", "siqa_local"),
        description="local task names, paths to .jsonl files {query, choices, gold}, "
                    "or lm-eval task names (need the Hugging Face Hub)")
    mc_limit: int = Field(200, ge=1, le=1_000_000, description="examples per task (first N)")
    speed: bool = Field(True, description="measure prefill and decode tokens/s")
    speed_decode_tokens: int = Field(32, ge=1, le=4096, description="tokens per decode probe")
    speed_repeats: int = Field(3, ge=1, le=100, description="timed repeats (median reported)")
    batch_size: int = Field(4, ge=1, le=1024)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, ge=0)

    @field_validator("mc_tasks")
    @classmethod
    def _tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(t.strip() for t in tasks)
        if any(not t for t in cleaned):
            raise ValueError("task names must be non-empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("task names must be unique")
        return cleaned

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return device
