"""Config of the ``evaluate`` stage: budgets for perplexity, multiple choice and speed.

Defaults are sized for a CPU (the default job evaluates the dense and one pruned
SmolLM2-135M in about a minute each on 2 cores): 2048 held-out tokens per corpus
source (4 windows of 512 tokens), the first 100 examples of each multiple-choice task,
no speed probe. The flow evaluates its models one after another, each with every CPU
thread (two at once oversubscribe the cores: about 2x slower in total on 2 cores).

Speed is off by default: a throughput figure is only worth comparing when the models
are timed side by side on a quiet machine, and a shared CPU (or the evaluation's own
other work) makes single probes taken minutes apart disagree by tens of percent, even
in direction. ``speed=True`` times each model last in its evaluation, and a pruned
checkpoint interleaved with its dense source model (the ``*_speedup`` rows); for a
careful benchmark use ``benchmarks/speed.py``.

Scaling up (a GPU, or a long CPU run): raise the budgets, which are what the results'
precision depends on: ``ppl_tokens`` (e.g. 32768: 64 windows per source) and
``mc_limit`` (e.g. 1000: all of ``mmlu_local``; ``siqa_local`` has 2219 valid items);
on the command line ``gprune run --eval-tokens 32768 --mc-limit 1000``. The standard
error of an accuracy is about ``0.5 / sqrt(mc_limit)`` (0.05 at 100, 0.016 at 1000).
``batch_size`` and ``mc_batch_size`` only set throughput (results agree to float
rounding); on a GPU 16 and 64 keep it busier. Every field enters the artifact key.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class EvalConfig(StageConfig):
    """Budgets of one evaluation.

    Perplexity: per corpus source, ``ceil(ppl_tokens / seq_len)`` windows of ``seq_len``
    tokens drawn from the held-out split (``gprune.data.corpus.sample_sequences`` with
    ``seed``); ``seq_len`` is cut to the model's context length when longer. Multiple
    choice: the first ``mc_limit`` valid examples of each task, zero-shot, scored by
    lm-eval through ``gprune.eval.shared_context.SharedContextHFLM`` (each question's
    context computed once for all of its options). Speed (``speed=True``): prefill of
    ``seq_len`` tokens and ``speed_decode_tokens`` greedy decode steps at batch 1, median
    of ``speed_repeats``, measured last; for a pruned checkpoint its dense source model is
    loaded too and the two are timed interleaved (``gprune.maths.evaluate.measure_speeds``),
    which adds the speedup rows.
    """

    ppl_tokens: int = Field(2048, ge=2, le=10_000_000,
                            description="held-out tokens per corpus source (perplexity budget)")
    seq_len: int = Field(512, ge=2, le=131072, description="tokens per perplexity window")
    mc_tasks: tuple[str, ...] = Field(
        ("mmlu_local", "siqa_local"),
        description="local task names, paths to .jsonl files {query, choices, gold}, "
                    "or lm-eval task names (need the Hugging Face Hub)")
    mc_limit: int = Field(100, ge=1, le=1_000_000, description="examples per task (first N)")
    speed: bool = Field(False, description="measure prefill and decode tokens/s (batch 1), "
                                           "a pruned model interleaved with its dense source")
    speed_decode_tokens: int = Field(16, ge=1, le=4096, description="tokens per decode probe")
    speed_repeats: int = Field(3, ge=1, le=100, description="timed repeats (median reported)")
    batch_size: int = Field(4, ge=1, le=1024, description="perplexity windows per forward pass")
    mc_batch_size: int = Field(16, ge=1, le=4096,
                               description="multiple choice: contexts (of equal token length) "
                                           "per forward pass, each with all its continuations")
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
