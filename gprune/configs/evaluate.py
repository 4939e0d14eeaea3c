"""What the three evaluation stages' configs share, and how to size their budgets.

Evaluation is three stages, each with its own config and artifact, so changing one
budget recomputes only that stage: ``perplexity`` (``PerplexityConfig``: held-out
perplexity per corpus source, plus size and FLOPs), ``choice`` (``ChoiceConfig``:
multiple-choice accuracy) and ``speed`` (``SpeedConfig``: prefill/decode tokens/s).
Every field of a config enters its own stage's artifact key only.

Defaults are sized for a CPU (the default job evaluates the dense and one pruned
SmolLM2-135M in about a minute each on 2 cores): 2048 held-out tokens per corpus
source (4 windows of 512 tokens), the first 50 examples of each multiple-choice task,
no speed probe. The flow runs its evaluations one after another, each with every CPU
thread (two at once oversubscribe the cores: about 2x slower in total on 2 cores).

Speed is off by default (``PipelineConfig.speed``): a throughput figure is only worth
comparing when the models are timed side by side on a quiet machine, and a shared CPU
makes single probes taken minutes apart disagree by tens of percent, even in direction.
When on, a pruned checkpoint is timed interleaved with its dense source model (the
``*_speedup`` rows); for a careful benchmark use ``benchmarks/speed.py``.

Scaling up (a GPU, or a long CPU run): raise the budgets, which are what the results'
precision depends on: ``ppl_tokens`` (e.g. 32768: 64 windows per source) and
``mc_limit`` (e.g. 1000: all of ``mmlu_local``; ``siqa_local`` has 2219 valid items);
on the command line ``gprune run --eval-tokens 32768 --mc-limit 1000``. The standard
error of an accuracy is about ``0.5 / sqrt(mc_limit)`` (0.07 at 50, 0.016 at 1000).
``batch_size`` and ``mc_batch_size`` only set throughput (results agree to float
rounding); on a GPU 16 and 64 keep it busier.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class EvalStageConfig(StageConfig):
    """Fields every evaluation stage has: where it runs and its seed."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    seed: int = Field(0, ge=0, description="seed of torch and of any sampling (windows, prompts)")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return device
