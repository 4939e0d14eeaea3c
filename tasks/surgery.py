"""Stage 6, surgery: slice the dense model to a plan and save a pruned HF checkpoint.

Inputs: a plan artifact (``plan.json``; its manifest names the model path) and what the
reconstruction needs: for ``bias`` a stats artifact (``channels.parquet`` pooled channel
means), for ``lsq`` the gram artifacts of the calibration sources (averaged, each source
normalized by its token count, so no source dominates). The manifest records, for lsq,
the residual error and the kept Gram's condition number of every refit projection.
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
from gprune.maths.surgery import apply_plan, bias_fits, channel_means, lsq_fits
from gprune.models.adapters import adapter_for
from gprune.models.loader import (ModelRef, load_model, load_tokenizer, resolve_device,
                                  resolve_model)
from gprune.models.pruned import finalize, param_count, save_pruned
from gprune.models.streamed import streamed_source
from gprune.models.streamed_checkpoint import save_pruned_streamed
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
                model: str | None = None, gram_keys: list[str] | None = None) -> str:
    """Slice the model (default: the plan's own) to the plan, reconstruct the output
    projections, store the pruned checkpoint; return the artifact key. A plan made for
    another model is refused."""
    plan, ref = read_plan(store, plan_key, model)
    mode = config.reconstruct or plan.reconstruct
    inputs = {"plan": plan_key, **_reconstruction_inputs(mode, stats_key, gram_keys)}
    params = {**config.params(), "reconstruct": mode}
    if mode != "lsq":
        params.pop("ridge")
    spec = stage_spec(ref.fingerprint, inputs, params)

    def build(pending: PendingArtifact) -> None:
        _build(pending, config, store, plan, ref, plan_key, mode, inputs)

    return run_stage(store, STAGE, spec, build, force=force)


def _reconstruction_inputs(mode: str, stats_key: str | None,
                           gram_keys: list[str] | None) -> dict:
    if mode == "bias":
        if not stats_key:
            raise ConfigError("reconstruct=bias needs channel means: pass a stats artifact key "
                              "(--stats)")
        return {"stats": stats_key}
    if mode == "lsq":
        if not gram_keys:
            raise ConfigError("reconstruct=lsq needs Gram statistics: run `gprune stage gram` "
                              "for each calibration source first and pass their keys (--gram)")
        return {"grams": sorted(gram_keys)}
    return {}


def _fits(store: ArtifactStore, plan: PruningPlan, mode: str, inputs: dict,
          ridge: float, report: list[dict]):
    if mode == "bias":
        return bias_fits(read_means(store, inputs["stats"], plan))
    if mode == "lsq":
        from tasks.gram import gram_memo, pooled_gram

        grams = lambda layer, kind: pooled_gram(store, inputs["grams"], layer, kind)  # noqa: E731
        return lsq_fits(grams, ridge, report, memo=gram_memo(store, inputs["grams"]))
    return None


def _build(pending: PendingArtifact, config: SurgeryConfig, store: ArtifactStore,
           plan: PruningPlan, ref: ModelRef, plan_key: str, mode: str, inputs: dict) -> None:
    report: list[dict] = []
    fits = _fits(store, plan, mode, inputs, config.ridge, report)
    device = resolve_device(config.device)
    manifest = {
        "source_model": str(ref.path), "source_spec": ref.spec,
        "source_fingerprint": ref.fingerprint, "method": plan.method,
        "target_sparsity": plan.target_sparsity,
        "achieved_sparsity": plan.achieved_sparsity, "plan_key": plan_key,
        "reconstruct": mode, "reconstruction_inputs": inputs,
        "prunable_params": plan.prunable_params,
        "kept_prunable_params": plan.kept_prunable_params, "dtype": config.dtype,
    }
    source = streamed_source(ref.path, device, config.stream, 1, dtype=config.torch_dtype)
    if source is not None:                     # one decoder layer in memory at a time
        manifest["family"] = source.adapter.name
        manifest.update(save_pruned_streamed(source, plan, fits, pending.file(MODEL_DIR),
                                             load_tokenizer(ref.path), manifest,
                                             config.torch_dtype))
    else:
        model, tokenizer, adapter = load_model(ref, device=device, dtype=config.torch_dtype)
        manifest.update(family=adapter.name, dense_params=param_count(model))
        finalize(model, adapter, apply_plan(model, adapter, plan, fits))
        manifest["pruned_params"] = param_count(model)
        save_pruned(model, tokenizer, pending.file(MODEL_DIR), manifest)
    pending.extra.update(manifest)
    if report:
        pending.extra["refit"] = report
        worst = max(report, key=lambda r: r["condition"])
        log.info("surgery: lsq refit of %d projections; largest condition number %.3g "
                 "(layer %d %s)", len(report), worst["condition"], worst["layer"], worst["kind"])
    log.info("surgery: %s -> %d params (%.1f%% prunable removed, reconstruct=%s)", ref.spec,
             manifest["pruned_params"], 100 * plan.achieved_sparsity, mode)
