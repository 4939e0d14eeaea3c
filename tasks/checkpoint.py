"""What the evaluation stages (``perplexity``, ``choice``, ``speed``) share: which model a
key or spec names, its run metadata, loading it, and writing a results table.

``model`` is a surgery artifact key (``surgery-…``: its ``model/`` folder is loaded)
or a dense model spec (``smollm2``, ``tiny:llama``, a folder). An evaluation artifact's
key depends on the checkpoint's identity (surgery key or dense fingerprint), never on
the spec's spelling, so the dense model is evaluated once and reused by every pruning
run. Each stage writes ``results.parquet`` (schema in ``gprune.eval.results``) and puts
the run metadata (``Checkpoint.extra``) in its manifest's extra, so the report can
group the artifacts of one model into one run.
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.evaluate import EvalStageConfig
from gprune.eval.results import RESULTS_FILE, results_frame
from gprune.models.loader import resolve_device, resolve_model

log = logging.getLogger("gprune")


@dataclass(frozen=True)
class Checkpoint:
    identity: str                 # surgery key or dense fingerprint
    path: Path                    # HF folder
    extra: dict[str, Any] = field(default_factory=dict)
    source: tuple[str, str] | None = None  # a pruned model's dense (spec, fingerprint)


def resolve_checkpoint(store: ArtifactStore, model: str) -> Checkpoint:
    """A surgery artifact's model folder and run metadata, or a dense model."""
    if model.startswith("surgery-"):
        art = store.read(model, stage="surgery")
        extra = art.extra
        sparsity = extra.get("target_sparsity")
        return Checkpoint(model, art.path / "model", {
            "model": extra.get("source_spec") or art.manifest.get("model"),
            "method": extra.get("method", "unknown"),
            "target_sparsity": float(sparsity) if sparsity is not None else math.nan,
            "achieved_sparsity": extra.get("achieved_sparsity"),
            "calibration_sources": _calibration_sources(store, extra)},
            source=(extra["source_spec"], extra["source_fingerprint"])
            if extra.get("source_spec") and extra.get("source_fingerprint") else None)
    ref = resolve_model(model)
    return Checkpoint(ref.fingerprint, ref.path, {
        "model": model, "method": "dense", "target_sparsity": 0.0, "achieved_sparsity": 0.0,
        "calibration_sources": []})


def _calibration_sources(store: ArtifactStore, extra: dict[str, Any]) -> list[str]:
    """From the surgery manifest's extra, else from its plan artifact's extra, else none."""
    if "calibration_sources" in extra:
        return sorted(extra["calibration_sources"])
    plan_key = extra.get("plan_key")
    if plan_key and store.exists(plan_key):
        return sorted(store.read(plan_key).extra.get("calibration_sources", []))
    return []


def load_checkpoint(config: EvalStageConfig, checkpoint: Checkpoint, stream: str = "off",
                    batch_tokens: int = 0):
    """Seed torch and load the checkpoint: (model, tokenizer, adapter, device). With
    ``stream`` auto/on (``gprune.models.streamed.should_stream``) ``model`` may be a
    ``StreamedModel`` for batches of ``batch_tokens`` (its ``model``: the weightless one)."""
    from gprune.models.streamed import open_model

    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model, tokenizer, adapter, streamed = open_model(checkpoint.path, device, stream,
                                                     batch_tokens)
    return streamed or model, tokenizer, adapter, device


def write_results(pending: PendingArtifact, rows: list[dict], checkpoint: Checkpoint,
                  **extra: Any) -> None:
    """``results.parquet`` of ``rows`` and the run metadata (plus ``extra``) in the manifest."""
    results_frame(rows).to_parquet(pending.file(RESULTS_FILE), index=False)
    pending.extra.update({**checkpoint.extra, **extra})


def window_length(stage: str, tokens: int, model) -> int:
    """``tokens`` cut to the model's context length (with a warning when cut)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokens > limit:
        log.warning("%s: %d tokens exceed the model's %d positions; using %d",
                    stage, tokens, limit, limit)
        return int(limit)
    return tokens


def progress_bars() -> bool:
    """Bars on a terminal only; logs get one line per measurement instead."""
    return sys.stderr.isatty()
