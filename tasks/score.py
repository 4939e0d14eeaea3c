"""Stage 4 task: stats + partition -> the method's unit scores and the per-module record."""
from __future__ import annotations

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.score import ScoreConfig
from gprune.methods.registry import method_class
from tasks.base import run_stage, stage_spec


def run_score(config: ScoreConfig, store: ArtifactStore, stats_key: str, partition_key: str,
              force: bool = False) -> str:
    stats = store.read(stats_key, stage="stats")
    partition = store.read(partition_key, stage="partition")
    spec = stage_spec(stats.manifest["model"], {"stats": stats_key, "partition": partition_key},
                      config.params())

    def build(out):
        units = pd.read_parquet(stats.file("units.parquet"))
        modules_of_units = pd.read_parquet(partition.file("modules.parquet"))
        scores, modules = method_class(config.method).score_units(
            units, modules_of_units, **config.settings)
        scores.to_parquet(out.file("scores.parquet"), index=False)
        modules.to_parquet(out.file("modules.parquet"), index=False)
        gated = modules[modules.metric_used == "weight"]
        out.extra.update({"modules": int(len(modules)), "weight_scored_modules": int(len(gated)),
                          "weight_scored_units": int(gated["size"].sum())})

    return run_stage(store, "score", spec, build, force)
