"""Stage ``path``: scores -> the learned path of keep fractions that every target reads.

One learning run (``gprune.methods.allocators.LearnedPath``, METHOD.md stage 5) over
a grid of target sparsities; the allocate stage reads the path at any target, so a
sweep of targets costs one learning run. Output: ``path.parquet`` (per module: kind,
layer, module, the path's parameters a and b); extra: grid, objective per step.
"""
from __future__ import annotations

import logging
import time

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.allocate import AllocateConfig
from gprune.errors import ConfigError
from gprune.methods.allocators import AllocationInputs, allocator
from tasks.allocate import stats_shape
from tasks.base import run_stage, stage_spec
from tasks.learning import learning_inputs

log = logging.getLogger("gprune")


def run_path(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
             force: bool = False) -> str:
    """The learned path of these scores (``config.sparsity`` is not used)."""
    chosen = allocator(config.allocator)
    if not chosen.uses_path:
        raise ConfigError(f"allocator {chosen.name} learns no path; "
                          "only path allocators (e.g. learned_path) have a path stage")
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    spec = stage_spec(stats.manifest["model"], {"score": score_key, "stats": stats_key},
                      config.path_params())

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        started = time.time()
        inputs = AllocationInputs(scores, shape, config.sparsity, config.prune_attention,
                                  config.learn_settings(),
                                  learning=lambda: learning_inputs(config, store, stats))
        table, history = chosen.learn(inputs, config.path_grid)
        table.to_parquet(out.file("path.parquet"), index=False)
        seconds = round(time.time() - started, 2)
        log.info("path: learned over targets %s in %.1fs", list(config.path_grid), seconds)
        out.extra.update({"path_seconds": seconds, "objective": history,
                          "grid": list(config.path_grid)})

    return run_stage(store, "path", spec, build, force)
