"""Stage 6, surgery: slice the dense model to a plan and save a pruned HF checkpoint.

Inputs: a plan artifact (``plan.json``; its manifest names the model path) and, with
bias compensation, a stats artifact (``channels.parquet`` pooled channel means).
Output: ``model/``, an HF folder loadable with ``AutoModelForCausalLM.from_pretrained(
path, trust_remote_code=True)`` and with ``gprune.models.loader.load_model``.
"""
from __future__ import annotations

import logging

import pandas as pd

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ArtifactError, ConfigError
from gprune.maths.plan import PLAN_FILE, PruningPlan
from gprune.maths.surgery import apply_plan, channel_means
from gprune.models.adapters import adapter_for
from gprune.models.loader import ModelRef, load_model, resolve_device, resolve_model
from gprune.models.pruned import finalize, param_count, save_pruned
from tasks.base import run_stage, stage_spec

log = logging.getLogger("gprune")
STAGE = "surgery"
MODEL_DIR = "model"


def read_plan(store: ArtifactStore, plan_key: str,
              model: str | None = None) -> tuple[PruningPlan, ModelRef]:
    """The plan of a plan artifact and the model it is applied to (``model``, else the
    plan's own model_path), refusing a plan made for another model."""
    from transformers import AutoConfig

    artifact = store.read(plan_key, stage="allocate")
    plan = PruningPlan.read(artifact.file(PLAN_FILE))
    model = model or artifact.extra.get("model_path")
    if not model:
        raise ArtifactError(f"plan {plan_key} does not record its model_path; rerun the plan stage")
    ref = resolve_model(str(model))
    config = AutoConfig.from_pretrained(ref.path)
    plan.validate_against(adapter_for(config).shape(config), ref.fingerprint)
    return plan, ref


def read_means(store: ArtifactStore, stats_key: str, plan: PruningPlan) -> dict:
    """Pooled channel means of a stats artifact, one tensor per (layer, kind)."""
    artifact = store.read(stats_key, stage="stats")
    if artifact.manifest.get("model") not in (None, plan.model_fingerprint):
        raise ConfigError(f"stats {stats_key} were captured on model {artifact.manifest['model']} "
                          f"but the plan is for {plan.model_fingerprint}; use matching stats")
    frame = pd.read_parquet(artifact.file("channels.parquet"),
                            columns=["layer", "kind", "channel", "mean"])
    try:
        return channel_means(frame, plan.dense)
    except ValueError as err:
        raise ArtifactError(f"stats {stats_key}: {err}; rerun the stats stage") from err


def run_surgery(config: SurgeryConfig, store: ArtifactStore, plan_key: str,
                stats_key: str | None = None, force: bool = False,
                model: str | None = None) -> str:
    """Slice the model (default: the plan's own) to the plan and store the pruned
    checkpoint; return the artifact key. A plan made for another model is refused."""
    plan, ref = read_plan(store, plan_key, model)
    compensate = config.bias_compensation or plan.bias_compensation
    if compensate and not stats_key:
        raise ConfigError("bias compensation needs channel means: pass a stats artifact key")
    stats_key = stats_key if compensate else None
    params = {**config.params(), "bias_compensation": compensate}
    spec = stage_spec(ref.fingerprint, {"plan": plan_key, "stats": stats_key}, params)

    def build(pending: PendingArtifact) -> None:
        _build(pending, config, store, plan, ref, plan_key, stats_key)

    return run_stage(store, STAGE, spec, build, force=force)


def _build(pending: PendingArtifact, config: SurgeryConfig, store: ArtifactStore,
           plan: PruningPlan, ref: ModelRef, plan_key: str, stats_key: str | None) -> None:
    means = read_means(store, stats_key, plan) if stats_key else None
    device = resolve_device(config.device)
    model, tokenizer, adapter = load_model(ref, device=device, dtype=config.torch_dtype)
    dense_params = param_count(model)
    sizes = apply_plan(model, adapter, plan, means)
    finalize(model, adapter, sizes)
    manifest = {
        "source_model": str(ref.path), "source_spec": ref.spec,
        "source_fingerprint": ref.fingerprint, "family": adapter.name,
        "method": plan.method, "target_sparsity": plan.target_sparsity,
        "achieved_sparsity": plan.achieved_sparsity, "plan_key": plan_key,
        "stats_key": stats_key, "bias_compensation": stats_key is not None,
        "dense_params": dense_params, "pruned_params": param_count(model),
        "prunable_params": plan.prunable_params,
        "kept_prunable_params": plan.kept_prunable_params, "dtype": config.dtype,
    }
    save_pruned(model, tokenizer, pending.file(MODEL_DIR), manifest)
    pending.extra.update(manifest)
    log.info("surgery: %s -> %d params (%.1f%% prunable removed)", ref.spec,
             manifest["pruned_params"], 100 * plan.achieved_sparsity)
