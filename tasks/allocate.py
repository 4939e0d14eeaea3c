"""Stage ``allocate``: scores (+ the learned path) -> the pruning plan of one target.

The only stage that depends on the target sparsity: one capture, stats, partition,
score and path serve every target. The allocator (``gprune.methods.allocators``, by
name) gives keep fractions; they are projected onto the exact parameter budget and
the best-scored units of each module are kept. Output: ``plan.json`` (a
``PruningPlan``) and ``modules.parquet`` (per module: size, keep fraction, kept).
"""
from __future__ import annotations

import logging
import time

import pandas as pd

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.allocate import AllocateConfig
from gprune.errors import ArtifactError, ConfigError
from gprune.maths.allocate import harden, project
from gprune.maths.budget import check_target
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.refine import corrected
from gprune.methods.allocators import AllocationInputs, allocator
from gprune.models.adapters import ModelShape
from tasks.allocate_refine import refine_allocation
from tasks.base import run_stage, runtime_code, stage_spec
from tasks.learning import learning_inputs

log = logging.getLogger("gprune")
TOLERANCE = 0.005  # achieved sparsity within 0.5 percentage points of the target


def stats_shape(stats: Artifact) -> ModelShape:
    return ModelShape(**stats.extra["shape"])


def run_allocate(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
                 method: str = "gprune", reconstruct: str = "none",
                 force: bool = False, path_key: str | None = None,
                 gram_keys: list[str] | None = None) -> str:
    """The plan of one target; ``path_key``: the path stage's artifact (allocators that
    use a path need it, the others refuse one); ``gram_keys``: the calibration sources'
    Grams (``config.kl_check`` needs them)."""
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    check_target(shape, config.sparsity, config.mlp_floor, config.prune_attention)
    chosen = allocator(config.allocator)
    _check_path(chosen, path_key)
    if config.kl_check and not gram_keys:
        raise ConfigError("kl_check refits candidate plans from Gram statistics: run `gprune "
                          "stage gram` for every calibration source and pass --gram KEY...")
    params = {**config.key_params(), "method": method, "reconstruct": reconstruct,
              **runtime_code(chosen, "gprune.methods.allocators")}
    inputs = {"score": score_key, "stats": stats_key, **({"path": path_key} if path_key else {}),
              **({"grams": sorted(gram_keys)} if config.kl_check else {})}
    spec = stage_spec(stats.manifest["model"], inputs, params)

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        path = store.read(path_key, stage="path") if path_key else None
        started = time.time()
        inputs = AllocationInputs(
            scores, shape, config.sparsity, config.prune_attention, config.learn_settings(),
            path_table=_path_table(path, config),
            learning=lambda: learning_inputs(config, store, stats),
            mlp_floor=config.mlp_floor, params=config.allocator_params)
        fractions, history = chosen.fractions(inputs)
        refined = _path_corrections(path)
        if refined is not None:            # refined by the path stage at its grid points
            fractions = corrected(fractions, refined, config.sparsity)
        alloc = chosen.allocation(fractions, inputs)
        ranked = chosen.ranked(scores, inputs)
        make_plan = lambda a: build_plan(config, stats, ranked, a, shape, method,  # noqa: E731
                                         reconstruct, score_key)
        if refined is None and config.kl_check and config.refine_steps:
            fractions, alloc, out.extra["refine"] = refine_allocation(
                config, store, stats, shape, fractions, alloc,
                lsq_check_fits(config, store, gram_keys), make_plan)
        plan = make_plan(alloc)
        if config.kl_check:
            plan = _checked(plan, config, store, stats, scores, shape, method, reconstruct,
                            score_key, gram_keys, out.extra)
        _check_budget(plan)
        plan.write(out.path)
        _module_table(fractions, alloc, shape).to_parquet(out.file("modules.parquet"), index=False)
        seconds = round(time.time() - started, 2)
        log.info("allocate %s at %.2f: achieved %.4f in %.1fs", method, config.sparsity,
                 plan.achieved_sparsity, seconds)
        out.extra.update({"achieved_sparsity": plan.achieved_sparsity, "method": method,
                          "allocator_seconds": seconds, "objective": history,
                          "model_path": stats.extra["model_path"],
                          "calibration_sources": stats.extra["sources"]})

    return run_stage(store, "allocate", spec, build, force)


def _path_corrections(path: Artifact | None) -> pd.DataFrame | None:
    """The path stage's refinement at its grid points (``refine.parquet``), if it refined."""
    if path is None or "refine.parquet" not in path.manifest.get("files", {}):
        return None
    return pd.read_parquet(path.file("refine.parquet"))


def _check_path(chosen, path_key: str | None) -> None:
    if chosen.uses_path and not path_key:
        raise ConfigError(f"allocator {chosen.name} reads a learned path: run "
                          "`gprune stage path` first and pass --path KEY")
    if path_key and not chosen.uses_path:
        raise ConfigError(f"allocator {chosen.name} uses no path; drop --path")


def _path_table(path: Artifact | None, config: AllocateConfig):
    if path is None:
        return None
    _check_grid(config, path.extra.get("grid", list(config.path_grid)))
    return pd.read_parquet(path.file("path.parquet"))


def build_plan(config, stats, scores, alloc, shape, method, reconstruct, score_key):
    layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]),
                             tuple(l["kv_keep"])) for l in harden(scores, alloc, shape))
    return PruningPlan(
        model_fingerprint=stats.manifest["model"], family=stats.extra["family"],
        method=method, target_sparsity=config.sparsity, dense=shape, layers=layers,
        reconstruct=reconstruct,
        extra={"allocator": config.allocator, "calibration_sources": stats.extra["sources"],
               "stats_key": stats.key, "score_key": score_key})


def _checked(plan, config, store, stats, scores, shape, method, reconstruct, score_key,
             gram_keys, extra: dict) -> PruningPlan:
    """``plan`` or the uniform MLP-only plan, whichever has the lower KL to dense after
    the lsq refit (``gprune.maths.plan_check``); records both KLs in ``extra``."""
    from gprune.maths.allocate import uniform_fractions
    from gprune.maths.plan_check import (calibration_rounds, choose_plan, pruned_copies,
                                         split_rounds)
    from gprune.maths.precision import in_precision, resolve_precision
    from gprune.maths.streamed_check import streamed_rounds
    from tasks.learning import check_inputs, streamed_check_inputs

    try:
        reference = build_plan(config, stats, scores, project(
            uniform_fractions(scores, shape, config.sparsity, False), shape, config.sparsity,
            config.mlp_floor, False), shape, method, reconstruct, score_key)
    except (ConfigError, ValueError) as err:     # the target needs heads removed
        extra["kl_check"] = {"skipped": f"no uniform MLP-only plan at this target: {err}"}
        return plan
    fits = lsq_check_fits(config, store, gram_keys)
    per_round = max(3, len(stats.extra["capture_keys"]))     # every source once a round
    streamed = streamed_check_inputs(config.check_config(), store, stats)
    if streamed is not None:                   # one decoder layer on the device at a time
        source, batches = streamed
        precision = "float32"                  # the streamed check runs its layers as read
        chosen, record = choose_plan(plan, reference, lambda plans: streamed_rounds(
            source, plans, fits, split_rounds(batches, per_round)))
    else:
        dense, adapter, batches, teacher = check_inputs(config.check_config(), store, stats)
        precision = resolve_precision(config.check_precision,
                                      str(next(dense.parameters()).device))
        chosen, record = choose_plan(plan, reference, lambda plans: calibration_rounds(
            dense, [in_precision(student, precision)
                    for student in pruned_copies(dense, adapter, plans, fits)],
            split_rounds(batches, per_round), teacher))
    record.update(streamed=streamed is not None, precision=precision)
    log.info("allocate %s at %.2f: KL to dense %.4f (plan) vs %.4f (uniform MLP-only) on %d "
             "of %d check sequences: kept the %s", method, config.sparsity, record["candidate"],
             record["reference"], record["sequences"], config.check_sequences,
             "plan" if record["chosen"] == "candidate" else "uniform MLP-only plan")
    extra["kl_check"] = record
    return chosen


def lsq_check_fits(config: AllocateConfig, store: ArtifactStore, gram_keys: list[str]):
    """The lsq refits of the check (and the refinement) from the sources' Grams."""
    from gprune.maths.surgery import lsq_fits
    from tasks.gram import gram_memo
    from tasks.path import gram_reader

    grams = sorted(gram_keys)           # surgery's order: the same pooled sums, the same memo
    return lsq_fits(gram_reader(store, grams, remember=2), config.ridge, [],
                    memo=gram_memo(store, grams))  # surgery finds the chosen plan's refits


def _check_grid(config: AllocateConfig, grid: list[float]) -> None:
    low, high = min(grid), max(grid)
    if not low - 0.05 <= config.sparsity <= high + 0.05:
        log.warning("allocate: target %.2f lies outside the learned path's grid [%.2f, %.2f]; "
                    "the path is extrapolated (widen path_grid to cover it)",
                    config.sparsity, low, high)


def _check_budget(plan: PruningPlan) -> None:
    if abs(plan.achieved_sparsity - plan.target_sparsity) > TOLERANCE:
        raise ArtifactError(f"allocation missed the budget: achieved {plan.achieved_sparsity:.4f} "
                            f"for target {plan.target_sparsity:.4f}; this is a bug, please report it")


def _module_table(fractions, alloc, shape: ModelShape) -> pd.DataFrame:
    rows = [{"layer": l, "kind": "mlp", "module": m, "size": n, "keep_fraction": fractions.mlp[(l, m)],
             "kept": alloc.mlp_counts[(l, m)]} for (l, m), n in fractions.mlp_sizes.items()]
    rows += [{"layer": l, "kind": "attn", "module": 0, "size": shape.heads, "keep_fraction": f,
              "kept": g * r} for l, f in fractions.attn.items()
             for g, r in [alloc.head_configs[l]]]
    return pd.DataFrame(rows)
