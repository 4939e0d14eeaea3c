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
from gprune.configs.attribution import AttributionConfig
from gprune.configs.base import StageConfig
from gprune.configs.capture import CaptureConfig
from gprune.configs.choice import ChoiceConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.export import ExportConfig, Outtype
from gprune.configs.neurons import NeuronsConfig
from gprune.configs.perplexity import PerplexityConfig
from gprune.configs.speed import SpeedConfig
from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ConfigError
from gprune.methods.registry import Method, MethodSpec, build_method

STAGES = ("corpus", "capture", "gram", "contexts", "stats", "partition", "score", "path", "allocate",
          "surgery", "export", "perplexity", "choice", "speed", "neurons", "attribution",
          "report")
DEFAULT_SOURCES = ["wikipedia", "web", "code", "news"]
DEFAULT_EVAL_SOURCES = ["wikipedia", "web", "code", "news", "math", "docs"]
_PPL, _CHOICE = PerplexityConfig.model_fields, ChoiceConfig.model_fields


class PipelineConfig(StageConfig):
    model: str = Field("smollm2", description="smollm2 (embedded default), gemma3, tiny:<family>, "
                                              "an HF folder, or a Hub id")
    sources: list[str] = Field(default_factory=lambda: list(DEFAULT_SOURCES), min_length=1,
                               description="calibration sources (wikipedia, web, code, news, "
                                           "math, docs, hf:<id>, or .txt/.jsonl/.parquet files)")
    eval_sources: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_SOURCES),
                                    description="held-out perplexity sources")
    sparsities: list[float] = Field(default_factory=lambda: [0.2], min_length=1,
                                    description="target fractions of prunable parameters")
    methods: list[MethodSpec] = Field(
        default_factory=lambda: ["gprune"], min_length=1,
        description="pruning methods: name or name:key=value,... (e.g. gprune:k=1,gate=false)")
    capture_sequences: int = Field(8, ge=1, description="calibration sequences per source "
                                   "(the capture and the Grams; benchmarks use 32)")
    capture_seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")
    capture_batch_size: int = Field(4, ge=1, description="sequences per capture forward pass")
    allocator_steps: Optional[int] = Field(
        None, ge=1, description="Adam steps of learned allocators (None: 48 for a path, "
                                "30 per target)")
    prune_attention: bool = Field(True, description="prune attention heads too (else MLP only)")
    evaluate: bool = Field(True, description="evaluate and report (else stop after surgery)")
    # evaluation budgets: the stage configs' CPU-sized defaults (gprune.configs.evaluate
    # says how to scale up); no mc_tasks: no choice stage; speed: run the speed stage
    eval_tokens: int = Field(_PPL["ppl_tokens"].default, ge=2,
                             description="held-out tokens per source (GPU: e.g. 32768)")
    eval_seq_len: int = Field(_PPL["seq_len"].default, ge=2, description="tokens per window")
    mc_tasks: list[str] = Field(default_factory=lambda: list(_CHOICE["mc_tasks"].default),
                                description="multiple-choice tasks (none: no choice stage)")
    mc_limit: int = Field(_CHOICE["mc_limit"].default, ge=1,
                          description="examples per task (GPU: e.g. 1000)")
    speed: bool = Field(False, description="time prefill/decode (pruned interleaved with dense)")
    export: Optional[Outtype] = Field(
        None, description="also write each checkpoint as a llama.cpp GGUF of this type "
                          "(stage export; Llama family)")
    attribution: bool = Field(False, description="NSA: per plan, which influential words lost "
                              "their units (stages neurons + attribution; HTML in the report)")
    attribution_tasks: list[str] = Field(
        default_factory=lambda: ["sentiment_local"], min_length=1,
        description="labelled tasks whose influential words the attribution follows")
    attribution_inputs: int = Field(16, ge=1, description="examples per task scored word by "
                                                           "word (leave-one-word-out)")
    attribution_tokens: int = Field(4096, ge=16, description="tokens of the first calibration "
                                                             "source matched to units")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where models run")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="layer-streamed capture, Grams, learned allocation, KL check, "
                            "surgery and perplexity: one decoder layer's "
                            "weights on the device at a time (docs/SCALE.md); auto: when the "
                            "weights do not fit the device's free memory")
    seed: int = Field(0, description="seed of every sampled choice")
    force: list[str] = Field(default_factory=list,
                             description=f"stages to recompute ({', '.join(STAGES)}, all)")

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

    @field_validator("methods")
    @classmethod
    def _methods(cls, specs: list[MethodSpec]) -> list[MethodSpec]:
        labels = [build_method(spec).label for spec in specs]  # unknown names, bad params
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"method {twice[0]} is given twice (their plans would overwrite "
                             "each other); give each method once")
        return specs

    def method_objects(self) -> list[Method]:
        return [build_method(spec) for spec in self.methods]

    # ---- per-stage configs -------------------------------------------------------
    def forced(self, stage: str) -> bool:
        return stage in self.force or "all" in self.force

    def corpus_config(self, source: str) -> CorpusConfig:
        return CorpusConfig(source=source, seed=self.seed)

    def capture_config(self, source: str) -> CaptureConfig:
        return CaptureConfig(source=source, n_sequences=self.capture_sequences,
                             seq_len=self.capture_seq_len, batch_size=self.capture_batch_size,
                             seed=self.seed, device=self.device, stream=self.stream)

    def allocate_config(self, method: Method, sparsity: float) -> AllocateConfig:
        return AllocateConfig(sparsity=sparsity, allocator=method.allocator, ridge=method.ridge,
                              prune_attention=self.prune_attention and method.prunes_heads,
                              steps=self.allocator_steps,
                              allocator_params=method.allocator_params(),
                              kl_check=method.kl_check, refine_steps=method.refine_steps,
                              seed=self.seed, device=self.device,
                              stream=self.stream)

    def surgery_config(self, method: Method) -> SurgeryConfig:
        return SurgeryConfig(reconstruct=method.reconstruct, ridge=method.ridge,
                             device=self.device, stream=self.stream)

    def perplexity_config(self) -> PerplexityConfig:
        return PerplexityConfig.build(ppl_tokens=self.eval_tokens, seq_len=self.eval_seq_len,
                                      device=self.device, seed=self.seed, stream=self.stream)

    def choice_config(self) -> Optional[ChoiceConfig]:
        """None when there are no mc_tasks (the flow then runs no choice stage)."""
        if not self.mc_tasks:
            return None
        return ChoiceConfig.build(mc_tasks=tuple(self.mc_tasks), mc_limit=self.mc_limit,
                                  device=self.device, seed=self.seed)

    def speed_config(self) -> Optional[SpeedConfig]:
        """None unless ``speed`` (the flow then runs no speed stage)."""
        if not self.speed:
            return None
        return SpeedConfig.build(prefill_tokens=self.eval_seq_len, device=self.device,
                                 seed=self.seed)

    def neurons_config(self) -> Optional[NeuronsConfig]:
        """None unless ``attribution`` (the flow then runs no neurons/attribution stage)."""
        if not self.attribution:
            return None
        return NeuronsConfig.build(sources=tuple(self.sources[:1]),
                                   tokens=self.attribution_tokens,
                                   tasks=tuple(self.attribution_tasks),
                                   inputs=self.attribution_inputs, device=self.device)

    def attribution_config(self) -> AttributionConfig:
        return AttributionConfig.build(device=self.device)

    def export_config(self) -> Optional[ExportConfig]:
        """None unless ``export`` names a GGUF type (the flow then exports nothing)."""
        return ExportConfig(outtype=self.export) if self.export else None


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
    for method in config.method_objects():
        if method.needs_sources > len(config.sources):
            raise ConfigError(f"method {method.label} needs distribution sensitivity from >= "
                              f"{method.needs_sources} sources; add --sources or use "
                              f"{method.name}:gate=false")
        if "contexts" in method.needs:   # FANG: K contexts + a shared group must fit
            from gprune.configs.contexts import ContextsConfig
            from gprune.maths.fang import group_sizes

            ContextsConfig.from_captures([config.capture_config(s) for s in config.sources],
                                         **method.contexts_settings())
            group_sizes(shape.intermediate, method.params.k + 1)
        k = method.partition_config().k
        if k > shape.intermediate:
            raise ConfigError(f"method {method.label}: k={k} exceeds the {shape.intermediate} "
                              "MLP channels of a layer")
        for sparsity in config.sparsities:
            check_target(shape, sparsity, 0.1, config.prune_attention and method.prunes_heads)
        method.check_model(shape, config.allocate_config(method, max(config.sparsities)),
                           config.choice_config())
    config.perplexity_config(), config.choice_config(), config.speed_config()
    if config.attribution:   # unlabelled or unknown tasks: one line before any work
        from gprune.eval.mc_tasks import labelled_rows

        for task in config.neurons_config().tasks:
            labelled_rows(task, 1)
    if config.export and ref.family not in ("llama",):
        raise ConfigError(f"--export: GGUF export supports the Llama family (SmolLM2) only; "
                          f"{config.model} is {ref.family}")
    return ref, shape


__all__ = ["PipelineConfig", "preflight", "STAGES"]
