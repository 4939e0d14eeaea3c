"""Stage 4 task: stats + partition -> the method's unit scores and the per-module record.

A method that needs the ``contexts`` statistics (FANG) also reads a contexts artifact and
the stats' per-layer cosine (``layers.parquet``)."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.score import ScoreConfig
from gprune.errors import ConfigError
from gprune.methods.registry import method_class
from tasks.base import run_stage, stage_spec


def run_score(config: ScoreConfig, store: ArtifactStore, stats_key: str, partition_key: str,
              force: bool = False, contexts_key: Optional[str] = None) -> str:
    stats = store.read(stats_key, stage="stats")
    partition = store.read(partition_key, stage="partition")
    method = method_class(config.method)
    if ("contexts" in method.needs) != bool(contexts_key):
        raise ConfigError(f"method {config.method} {'needs' if contexts_key is None else 'reads no'}"
                          " contexts artifact; " + ("run `gprune stage contexts` and pass its key"
                                                    if contexts_key is None else "drop it"))
    inputs = {"stats": stats_key, "partition": partition_key,
              **({"contexts": contexts_key} if contexts_key else {})}
    spec = stage_spec(stats.manifest["model"], inputs, config.params())

    def build(out):
        units = pd.read_parquet(stats.file("units.parquet"))
        modules_of_units = pd.read_parquet(partition.file("modules.parquet"))
        extra = {}
        if contexts_key:
            from tasks.contexts_files import read_contexts

            extra = {"contexts": read_contexts(store, contexts_key),
                     "layers": pd.read_parquet(stats.file("layers.parquet"))}
        scores, modules = method.score_units(units, modules_of_units, **extra, **config.settings)
        scores.to_parquet(out.file("scores.parquet"), index=False)
        modules.to_parquet(out.file("modules.parquet"), index=False)
        gated = modules[modules.metric_used == "weight"]
        out.extra.update({"modules": int(len(modules)), "weight_scored_modules": int(len(gated)),
                          "weight_scored_units": int(gated["size"].sum())})

    return run_stage(store, "score", spec, build, force)
