"""The refinement (``AllocateConfig.refine_steps``): each layer's MLP channel count moves by
the refit model's calibration KL, to first order (``gprune.maths.refine``), before the
kl_check compares the plan with the uniform MLP-only plan. Its batches are
``refine_sequences`` sequences drawn with seed + 2, so the check still judges the refined
plan on sequences it was not refined on.

With the learned path (``AllocateConfig.path_refines``) the path stage refines once per grid
point and stores each point's corrections (``refine.parquet``); the allocate stage adds
them, interpolated, at its target, so the targets of a sweep share the cost. At a grid point
the plan is the one a per-target refinement gives. Other allocators refine per target."""
from __future__ import annotations

import logging
import time
from typing import Callable

import pandas as pd
import torch

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.allocate import AllocateConfig
from gprune.maths.allocate import Allocation, Fractions, project
from gprune.maths.learned_path import path_fractions
from gprune.maths.plan import PruningPlan
from gprune.maths.plan_check import dense_terms, pruned_copies
from gprune.maths.precision import in_precision, resolve_precision
from gprune.maths.refine import (corrections, layer_gains, narrow_outputs, refined_fractions,
                                 widened)
from gprune.maths.surgery import Fits
from gprune.models.adapters import ModelShape
from tasks.learning import check_inputs, streamed_check_inputs

log = logging.getLogger("gprune")


def refine_allocation(config: AllocateConfig, store: ArtifactStore, stats: Artifact,
                      shape: ModelShape, fractions: Fractions, alloc: Allocation, fits: Fits,
                      make_plan: Callable[[Allocation], PruningPlan]
                      ) -> tuple[Fractions, Allocation, dict]:
    """(fractions, allocation, record) after ``config.refine_steps`` steps; the inputs
    unchanged, with the reason in the record, where the refinement does not apply."""
    skipped = _skipped(config, fractions, shape)
    if skipped is None and streamed_check_inputs(config.refine_config(), store, stats):
        skipped = "the model is layer-streamed (the refinement needs it in memory)"
    if skipped:
        log.info("allocate: no refinement: %s", skipped)
        return fractions, alloc, {"skipped": skipped}
    started = time.time()
    dense, adapter, batches, teacher = check_inputs(config.refine_config(), store, stats)
    device = next(dense.parameters()).device
    precision = resolve_precision(config.check_precision, str(device))
    head = dense.get_output_embeddings()

    @torch.no_grad()
    def teacher_terms(number: int, ids: torch.Tensor, mask: torch.Tensor):
        if teacher.hidden is not None:
            return teacher.terms(number, head, device)
        return dense_terms(dense(input_ids=ids, attention_mask=mask).logits)

    extra = max(1, round(config.refine_extra * shape.intermediate))
    gains_per_step = []
    for _ in range(config.refine_steps):
        plan, wide_plan = make_plan(alloc), make_plan(widened(alloc, fractions.mlp_sizes, extra))
        wide = pruned_copies(dense, adapter, [wide_plan], fits)[0]
        steps = narrow_outputs(wide, dense, adapter, plan, wide_plan, fits)
        gains = layer_gains(wide, adapter, steps, batches, teacher_terms,
                            forward=in_precision(wide, precision))
        fractions = refined_fractions(alloc, fractions, gains, extra)
        alloc = project(fractions, shape, config.sparsity, config.mlp_floor, False)
        gains_per_step.append([round(g, 6) for g in gains.tolist()])
    seconds = round(time.time() - started, 2)
    log.info("allocate: refined the MLP counts in %d step(s) of %d channels in %.1fs",
             config.refine_steps, extra, seconds)
    return fractions, alloc, {"steps": config.refine_steps, "extra": extra,
                              "sequences": sum(len(ids) for ids, _ in batches),
                              "precision": precision, "gains": gains_per_step,
                              "seconds": seconds}


def refine_path(config: AllocateConfig, store: ArtifactStore, stats: Artifact,
                shape: ModelShape, scores: pd.DataFrame, table: pd.DataFrame, fits: Fits,
                make_plan: Callable[[AllocateConfig, Allocation], PruningPlan]
                ) -> tuple[pd.DataFrame | None, dict]:
    """(corrections at every grid point of ``config.path_grid`` or None, record)."""
    rows, records = [], {}
    for sparsity in config.path_grid:
        at = config.model_copy(update={"sparsity": sparsity})
        base = path_fractions(table, scores, shape, sparsity, False)
        alloc = project(base, shape, sparsity, at.mlp_floor, False)
        refined, _, record = refine_allocation(at, store, stats, shape, base, alloc, fits,
                                               lambda a, at=at: make_plan(at, a))
        if "skipped" in record:
            return None, record
        rows.append(corrections(base, refined, sparsity))
        records[str(sparsity)] = record
    return pd.concat(rows, ignore_index=True), {"grid": records}


def _skipped(config: AllocateConfig, fractions: Fractions, shape: ModelShape) -> str | None:
    """Why the refinement does not apply to this allocation, or None."""
    if config.prune_attention:
        return "it moves MLP channels only (every head kept)"
    layers = [layer for layer, _ in fractions.mlp_sizes]
    if len(layers) != len(set(layers)) or len(layers) != shape.num_layers:
        return "it needs one MLP module per layer (k=1)"
    return None
