"""Render the report: PNG plots (matplotlib, no display needed) and Markdown.

Plots: perplexity against sparsity (one panel per corpus source), accuracy against
sparsity (one panel per task), and in-distribution vs out-of-distribution geo-mean
perplexity against sparsity; one line per method label, the dense model at 0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from gprune.report.table import DENSE, in_ood_series, skipped_rows, summary_table

PLOTS = {"ppl": "ppl_vs_sparsity.png", "acc": "accuracy_vs_sparsity.png",
         "in_ood": "in_vs_ood.png"}


def _lines(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method label: its points sorted by sparsity, the dense points prepended."""
    dense = frame[frame["method"] == DENSE]
    lines = {}
    for label, line in frame[frame["method"] != DENSE].groupby("label"):
        lines[label] = pd.concat([dense, line]).sort_values("target_sparsity")
    if not lines and len(dense):
        lines[DENSE] = dense
    return lines


def _panels(n: int, dpi: int) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, axes[:n]


def plot_metric(table: pd.DataFrame, kind: str, path: Path, dpi: int, log_y: bool) -> bool:
    """One panel per name of ``kind`` (ppl sources or mc tasks); False when there is none."""
    rows = table[table["kind"] == kind]
    names = sorted(rows["name"].unique())
    if not names:
        return False
    fig, axes = _panels(len(names), dpi)
    for ax, name in zip(axes, names):
        for label, line in _lines(rows[rows["name"] == name]).items():
            ax.plot(line["target_sparsity"], line["value"], marker="o", label=label)
        metric = rows.loc[rows["name"] == name, "metric"].iloc[0]
        ax.set(title=name, xlabel="sparsity", ylabel=metric)
        if log_y and kind == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path)
    return True


def plot_in_ood(table: pd.DataFrame, path: Path, dpi: int, log_y: bool) -> bool:
    """Geo-mean perplexity on in- vs out-of-distribution sources; False without data."""
    series = in_ood_series(table).dropna(subset=["ppl"])
    if series.empty:
        return False
    fig, axes = _panels(2, dpi)
    for ax, tag, title in zip(axes, ("in", "ood"), ("in-distribution", "out-of-distribution")):
        for label, line in series[series["tag"] == tag].groupby("label"):
            line = line.sort_values("sparsity")
            ax.plot(line["sparsity"], line["ppl"], marker="o", label=label)
        ax.set(title=f"{title} (geo-mean ppl)", xlabel="sparsity", ylabel="perplexity")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def render_plots(table: pd.DataFrame, folder: Path, dpi: int, log_y: bool) -> list[str]:
    """Write every plot that has data; return the file names written."""
    done = [plot_metric(table, "ppl", folder / PLOTS["ppl"], dpi, log_y),
            plot_metric(table, "mc", folder / PLOTS["acc"], dpi, False),
            plot_in_ood(table, folder / PLOTS["in_ood"], dpi, log_y)]
    return [name for name, ok in zip(PLOTS.values(), done) if ok]


def format_value(column: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column == "sparsity":
        return f"{value:.2f}"
    if column in ("params", "FLOPs/token"):
        return f"{value / 1e6:.2f}M"
    if column.startswith("ppl") or column.endswith("tok/s"):
        return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"
    return f"{value:.3f}"


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_no results_"
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_value(c, v) for c, v in zip(frame.columns, row)) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render_markdown(table: pd.DataFrame, title: str, plots: list[str],
                    protocol: dict[str, Any]) -> str:
    """The Markdown report: results, in/ood summary, data quality, protocol, plots."""
    summary = summary_table(table)
    calibrations = sorted({c for c in table["calibration"] if c})
    parts = [f"# {title}", "",
             f"{table['run'].nunique()} evaluated checkpoint(s); calibration sets: "
             f"{', '.join(calibrations) or 'none'}.", "", "## Results", "",
             markdown_table(summary), "",
             "`ppl in (geo)` / `ppl ood (geo)`: geometric-mean perplexity over the corpus "
             "sources that were / were not calibration sources of that run. Multiple-choice "
             "tasks are always out-of-distribution. FLOPs/token: forward pass at the mean "
             "causal context of one window.", "", "## Data quality", ""]
    skipped = skipped_rows(table)
    parts += [f"- {task}: {count} malformed row(s) skipped" for task, count in skipped.items()]
    parts += ["- no multiple-choice tasks" if not skipped else "", "## Protocol", ""]
    parts += [f"- {key}: {value}" for key, value in protocol.items()]
    parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(parts).rstrip() + "\n"
