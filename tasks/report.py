"""Stage ``report``: one table across methods and sparsities, Markdown and plots.

Reads evaluation artifacts of the ``perplexity``, ``choice`` and ``speed`` stages (and
the ``export`` stage's GGUF size) and
groups them by the model they evaluated: a *run* is one model (the dense model or one
checkpoint), and its rows come from whichever of its three artifacts were given. Writes
``results.parquet`` and ``results.csv`` (the long table: run columns + result columns,
see ``gprune.report.table``), ``summary.csv`` (one row per run), ``report.md`` and the
PNG plots. In a Prefect run the flow calls ``gprune.report.publish.publish_to_prefect``
on the artifact folder.
"""
from __future__ import annotations

import pandas as pd

from artifacts.store import Artifact, ArtifactStore, PendingArtifact
from gprune.configs.report import ReportConfig
from gprune.errors import ConfigError
from gprune.eval.results import RESULTS_FILE
from gprune.report.render import render_markdown, render_plots
from gprune.report.table import long_table, summary_table
from tasks.base import run_stage, stage_spec

EVAL_STAGES = ("perplexity", "choice", "speed", "export")   # export: the GGUF's size
# stage parameters listed in the report's protocol (each from the stages that have it)
PROTOCOL_PARAMS = ("ppl_tokens", "seq_len", "mc_limit", "mc_tasks", "prefill_tokens",
                   "decode_tokens", "repeats", "seed")


def load_runs(store: ArtifactStore, eval_keys: list[str]) -> list[dict]:
    """One run dict (for ``long_table``) per evaluated model, from its artifacts in
    ``eval_keys``; at most one artifact per stage and model."""
    grouped: dict[str, dict[str, Artifact]] = {}
    for key in eval_keys:
        art = store.read(key)
        if art.stage not in EVAL_STAGES:
            raise ConfigError(f"report: {key} is a {art.stage} artifact; give keys of the "
                              f"{', '.join(EVAL_STAGES)} stages")
        found = grouped.setdefault(art.manifest["inputs"]["model"], {})
        if art.stage in found:
            raise ConfigError(f"report: {found[art.stage].key} and {key} are two {art.stage} "
                              "artifacts of one model; give one per model")
        found[art.stage] = art
    return [_run(identity, found) for identity, found in grouped.items()]


def _run(identity: str, found: dict[str, Artifact]) -> dict:
    """The run metadata (the same in each artifact's extra), per-stage params and keys,
    and the results of every artifact with an ``artifact`` column naming its source."""
    arts = [found[stage] for stage in EVAL_STAGES if stage in found]
    extra = {k: v for art in arts for k, v in art.extra.items()}
    frames = [pd.read_parquet(art.file(RESULTS_FILE)).assign(artifact=art.key) for art in arts]
    return {**extra, "run": identity, "keys": {a.stage: a.key for a in arts},
            "params": {a.stage: a.params for a in arts},
            "results": pd.concat(frames, ignore_index=True)}


def protocol(runs: list[dict]) -> dict[str, str]:
    """Evaluation budgets, with every distinct value listed when runs differ."""
    found: dict[str, str] = {}
    for name in PROTOCOL_PARAMS:
        values = sorted({str(params[name]) for run in runs
                         for params in run["params"].values() if name in params})
        if values:
            found[name] = " / ".join(values)
    windows = sorted({str(run["seq_len_used"]) for run in runs if "seq_len_used" in run})
    if windows:
        found["seq_len used"] = " / ".join(windows)
    return found


def attribution_section(store: ArtifactStore, keys: list[str]) -> str:
    """Markdown linking each ``attribution`` artifact: its summary and its HTML page."""
    if not keys:
        return ""
    parts = ["", "## What pruning removed (NSA attribution)", ""]
    for key in keys:
        art = store.read(key, stage="attribution")
        parts += [art.file("summary.md").read_text(encoding="utf-8").strip(), "",
                  f"Page: `{art.file('attribution.html')}`; figures: "
                  f"`{art.file('damage.png')}`, `{art.file('labels.png')}`", ""]
    return "\n".join(parts)


def build_report(config: ReportConfig, runs: list[dict], pending: PendingArtifact,
                 extra_markdown: str = "") -> None:
    table = long_table(runs)
    table.to_parquet(pending.file("results.parquet"), index=False)
    table.to_csv(pending.file("results.csv"), index=False)
    summary_table(table).to_csv(pending.file("summary.csv"), index=False)
    plots = render_plots(table, pending.path, config.dpi, config.ppl_log_scale)
    markdown = render_markdown(table, config.title, plots, protocol(runs)) + extra_markdown
    pending.file("report.md").write_text(markdown, encoding="utf-8")
    pending.extra.update({"runs": len(runs), "plots": plots})


def run_report(config: ReportConfig, store: ArtifactStore, eval_keys: list[str],
               force: bool = False) -> str:
    """Build the report over ``eval_keys`` (perplexity, choice and speed artifact keys;
    ``attribution`` keys add a section linking each page); return the ``report`` key."""
    keys = sorted(set(eval_keys))
    attributions = [k for k in keys if k.startswith("attribution-")]
    keys = [k for k in keys if k not in attributions]
    if not keys:
        raise ConfigError("report: no evaluation artifacts given; run the perplexity, choice "
                          "or speed stage first")
    runs = load_runs(store, keys)
    inputs = {"evals": keys, **({"attributions": attributions} if attributions else {})}
    spec = stage_spec(None, inputs, config.params())
    section = attribution_section(store, attributions)
    return run_stage(store, "report", spec,
                     lambda pending: build_report(config, runs, pending, section), force=force)
