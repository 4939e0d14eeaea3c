"""The whole job's parameters (the gprune flow's parameters) and the checks run before any work.

``PipelineConfig`` turns flat, user-facing parameters into the typed config of
every stage. ``preflight`` resolves the model and rejects everything that would
fail later (unknown sources or methods, impossible targets, K too large, a gate
without >= 2 sources) before the first stage runs.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from gprune.configs.allocate import AllocateConfig
from gprune.configs.base import StageConfig
from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.evaluate import EvalConfig
from gprune.configs.methods import MethodConfig
from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ConfigError

STAGES = ("corpus", "capture", "stats", "partition", "score", "path", "plan", "surgery",
          "evaluate", "report")
DEFAULT_SOURCES = ["wikipedia", "web", "code", "news"]
DEFAULT_EVAL_SOURCES = ["wikipedia", "web", "code", "news", "math", "docs"]
_EVAL = EvalConfig.model_fields


class PipelineConfig(StageConfig):
    model: str = "smollm2"
    sources: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCES), min_length=1)
    eval_sources: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_SOURCES))
    sparsities: list[float] = Field(default_factory=lambda: [0.2], min_length=1)
    methods: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig()], min_length=1)
    capture_sequences: int = Field(32, ge=1)
    capture_seq_len: int = Field(512, ge=8)
    capture_batch_size: int = Field(4, ge=1)
    allocator_steps: Optional[int] = Field(None, ge=1,
                                           description="None: the allocator's default")
    prune_attention: bool = True
    evaluate: bool = True
    # evaluation budgets: EvalConfig's CPU-sized defaults (its docstring says how to scale up)
    eval_tokens: int = Field(_EVAL["ppl_tokens"].default, ge=2)
    eval_seq_len: int = Field(_EVAL["seq_len"].default, ge=2)
    mc_tasks: list[str] = Field(default_factory=lambda: list(_EVAL["mc_tasks"].default))
    mc_limit: int = Field(_EVAL["mc_limit"].default, ge=1)
    speed: bool = _EVAL["speed"].default
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    force: list[str] = Field(default_factory=list, description="stages to recompute")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, values: list[float]) -> list[float]:
        bad = [s for s in values if not 0 < s < 1]
        if bad:
            raise ValueError(f"sparsities must lie in (0, 1); got {bad}")
        return sorted(set(values))

    @field_validator("force")
    @classmethod
    def _stages(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - set(STAGES) - {"all"})
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}, all")
        return values

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, values):
        return [{"name": v} if isinstance(v, str) else v for v in values]

    # ---- per-stage configs -------------------------------------------------------
    def forced(self, stage: str) -> bool:
        return stage in self.force or "all" in self.force

    def corpus_config(self, source: str) -> CorpusConfig:
        return CorpusConfig(source=source, seed=self.seed)

    def capture_config(self, source: str) -> CaptureConfig:
        return CaptureConfig(source=source, n_sequences=self.capture_sequences,
                             seq_len=self.capture_seq_len, batch_size=self.capture_batch_size,
                             seed=self.seed, device=self.device)

    def allocate_config(self, method: MethodConfig, sparsity: float) -> AllocateConfig:
        return AllocateConfig(sparsity=sparsity, allocator=method.settings()["allocator"],
                              prune_attention=self.prune_attention, steps=self.allocator_steps,
                              seed=self.seed, device=self.device)

    def surgery_config(self, method: MethodConfig) -> SurgeryConfig:
        return SurgeryConfig(bias_compensation=method.settings()["bias_compensation"],
                             device=self.device)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(ppl_tokens=self.eval_tokens, seq_len=self.eval_seq_len,
                          mc_tasks=tuple(self.mc_tasks), mc_limit=self.mc_limit, speed=self.speed,
                          device=self.device, seed=self.seed)


def preflight(config: PipelineConfig):
    """Resolve the model and validate every choice against it; returns (ModelRef, ModelShape)."""
    from transformers import AutoConfig

    from gprune.data.corpus import source_kind
    from gprune.maths.budget import check_target
    from gprune.models.adapters import adapter_for
    from gprune.models.loader import resolve_model

    for source in {*config.sources, *config.eval_sources}:
        source_kind(source)  # unknown names raise, listing the known ones
    ref = resolve_model(config.model)
    model_config = AutoConfig.from_pretrained(ref.path)
    shape = adapter_for(model_config).shape(model_config)
    for method in config.methods:
        settings = method.settings()
        if settings["gate"] and len(config.sources) < 2:
            raise ConfigError(f"method {method.label} needs distribution sensitivity from >= 2 "
                              "sources; add --sources or use --no-gate")
        if settings["k"] > shape.intermediate:
            raise ConfigError(f"k={settings['k']} exceeds the {shape.intermediate} MLP channels "
                              "of a layer")
        for sparsity in config.sparsities:
            check_target(shape, sparsity, 0.1, config.prune_attention)
    config.eval_config()
    return ref, shape


__all__ = ["PipelineConfig", "preflight", "STAGES"]
