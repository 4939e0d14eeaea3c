"""Stage 3 task: stats artifact -> per-unit module labels (modules.parquet)."""
from __future__ import annotations

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.partition import PartitionConfig
from gprune.maths.partition import partition_units
from tasks.base import run_stage, stage_spec


def run_partition(config: PartitionConfig, store: ArtifactStore, stats_key: str,
                  force: bool = False) -> str:
    stats = store.read(stats_key, stage="stats")
    spec = stage_spec(stats.manifest["model"], {"stats": stats_key}, config.params())

    def build(out):
        units = pd.read_parquet(stats.file("units.parquet"))
        modules = partition_units(units, config.k, config.metric, config.seed, config.n_init)
        modules.to_parquet(out.file("modules.parquet"), index=False)
        sizes = modules[modules.kind == "mlp"].groupby(["layer", "module"]).size()
        out.extra.update({"modules": int(len(sizes)), "smallest_module": int(sizes.min()),
                          "largest_module": int(sizes.max())})

    return run_stage(store, "partition", spec, build, force)
