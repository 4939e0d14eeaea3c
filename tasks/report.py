"""Stage 7b, ``report``: one table across methods and sparsities, Markdown and plots.

Reads evaluate artifacts and writes ``results.parquet`` and ``results.csv`` (the long
table: run columns + result columns, see ``gprune.report.table``), ``summary.csv``
(one row per run), ``report.md`` and the PNG plots. In a Prefect run the flow calls
``gprune.report.publish.publish_to_prefect`` on the artifact folder.
"""
from __future__ import annotations

import pandas as pd

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.report import ReportConfig
from gprune.errors import ConfigError
from gprune.report.render import render_markdown, render_plots
from gprune.report.table import long_table, summary_table
from tasks.base import run_stage, stage_spec

PROTOCOL_PARAMS = ("ppl_tokens", "seq_len", "mc_limit", "mc_tasks", "seed")


def load_runs(store: ArtifactStore, eval_keys: list[str]) -> list[dict]:
    """Each evaluate artifact as a run dict for ``long_table``."""
    runs = []
    for key in eval_keys:
        art = store.read(key, stage="evaluate")
        runs.append({"eval_key": key, **art.extra, "params": art.params,
                     "results": pd.read_parquet(art.file("results.parquet"))})
    return runs


def protocol(runs: list[dict]) -> dict[str, str]:
    """Evaluation budgets, with every distinct value listed when runs differ."""
    found: dict[str, str] = {}
    for name in PROTOCOL_PARAMS:
        values = sorted({str(run["params"].get(name)) for run in runs})
        found[name] = " / ".join(values)
    windows = sorted({str(run.get("seq_len_used")) for run in runs})
    found["seq_len used"] = " / ".join(windows)
    return found


def build_report(config: ReportConfig, runs: list[dict], pending: PendingArtifact) -> None:
    table = long_table(runs)
    table.to_parquet(pending.file("results.parquet"), index=False)
    table.to_csv(pending.file("results.csv"), index=False)
    summary_table(table).to_csv(pending.file("summary.csv"), index=False)
    plots = render_plots(table, pending.path, config.dpi, config.ppl_log_scale)
    markdown = render_markdown(table, config.title, plots, protocol(runs))
    pending.file("report.md").write_text(markdown, encoding="utf-8")
    pending.extra.update({"runs": len(runs), "plots": plots})


def run_report(config: ReportConfig, store: ArtifactStore, eval_keys: list[str],
               force: bool = False) -> str:
    """Build the report over ``eval_keys``; return the ``report`` artifact key."""
    keys = sorted(set(eval_keys))
    if not keys:
        raise ConfigError("report: no evaluate artifacts given; run the evaluate stage first")
    runs = load_runs(store, keys)
    spec = stage_spec(None, {"evaluate": keys}, config.params())
    return run_stage(store, "report", spec, lambda pending: build_report(config, runs, pending),
                     force=force)
