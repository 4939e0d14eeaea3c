"""Stage ``path``: scores -> the target-independent artifact of a path allocator.

For ``learned_path`` (``gprune.methods.allocators.LearnedPath``, METHOD.md stage 5) one
learning run over a grid of target sparsities (``path.parquet``: per module kind, layer,
module, the path's parameters a and b); for ``refit_error`` every layer's ladder of
refit errors (``path.parquet``: layer, kind, option, params, error, keep). The
allocate stage reads the path at any target, so a sweep of targets costs one run.
"""
from __future__ import annotations

import functools
import logging
import time

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.allocate import AllocateConfig
from gprune.errors import ConfigError
from gprune.methods.allocators import AllocationInputs, allocator
from tasks.allocate import stats_shape
from tasks.base import run_stage, runtime_code, stage_spec
from tasks.learning import learning_inputs, margin_inputs, source_inputs

log = logging.getLogger("gprune")


def run_path(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
             force: bool = False, gram_keys: list[str] | None = None) -> str:
    """The path of these scores (``config.sparsity`` is not used); ``gram_keys``: the
    calibration sources' gram artifacts, for allocators that need Grams."""
    chosen = allocator(config.allocator)
    if not chosen.uses_path:
        raise ConfigError(f"allocator {chosen.name} learns no path; "
                          "only path allocators (e.g. learned_path) have a path stage")
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    inputs = {"score": score_key, "stats": stats_key}
    if chosen.needs_gram or config.path_refines:
        if not gram_keys:
            what = (f"allocator {chosen.name}" if chosen.needs_gram
                    else "the path's refinement (refine_steps with kl_check)")
            raise ConfigError(f"{what} needs Gram statistics: run `gprune stage gram` for "
                              "each calibration source first (--gram)")
        inputs["grams"] = sorted(gram_keys)
    params = {**config.path_params(), **runtime_code(chosen, "gprune.methods.allocators")}
    spec = stage_spec(stats.manifest["model"], inputs, params)

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        started = time.time()
        allocation = AllocationInputs(scores, shape, config.sparsity, config.prune_attention,
                                      config.learn_settings(),
                                      learning=lambda: learning_inputs(config, store, stats),
                                      grams=gram_reader(store, inputs.get("grams")),
                                      ridge=config.ridge, mlp_floor=config.mlp_floor,
                                      params=config.allocator_params,
                                      sources=lambda n, length: source_inputs(
                                          config.model_copy(update={"n_sequences": n,
                                                                    "seq_len": length}),
                                          store, stats),
                                      task_items=lambda task, n: margin_inputs(
                                          config, store, stats, task, n))
        table, history = chosen.learn(allocation, config.path_grid)
        table.to_parquet(out.file("path.parquet"), index=False)
        if config.path_refines:
            refined, out.extra["refine"] = _refined(config, store, stats, shape, score_key,
                                                    chosen.ranked(scores, allocation), table,
                                                    inputs["grams"])
            if refined is not None:
                refined.to_parquet(out.file("refine.parquet"), index=False)
        seconds = round(time.time() - started, 2)
        log.info("path: %s over targets %s in %.1fs", chosen.name, list(config.path_grid),
                 seconds)
        out.extra.update({"path_seconds": seconds, "objective": history,
                          "grid": list(config.path_grid)})

    return run_stage(store, "path", spec, build, force)


def _refined(config: AllocateConfig, store: ArtifactStore, stats, shape, score_key: str,
             scores: pd.DataFrame, table: pd.DataFrame, gram_keys: list[str]):
    """(the path's corrections at its grid points or None, record): ``refine_path``."""
    from tasks.allocate import build_plan, lsq_check_fits
    from tasks.allocate_refine import refine_path

    return refine_path(config, store, stats, shape, scores, table,
                       lsq_check_fits(config, store, gram_keys),
                       lambda at, alloc: build_plan(at, stats, scores, alloc, shape, "path",
                                                    "lsq", score_key))


def gram_reader(store: ArtifactStore, gram_keys: list[str] | None, remember: int = 0):
    """(layer, kind) -> the pooled normalized Gram of these gram artifacts (None: none);
    ``remember``: keep the last that many Grams read (callers that visit a layer twice in
    a row, e.g. two plans built together)."""
    if not gram_keys:
        return None
    from tasks.gram import pooled_gram

    def read(layer: int, kind: str):
        return pooled_gram(store, gram_keys, layer, kind)

    return functools.lru_cache(maxsize=remember)(read) if remember else read
