"""The report's tables: one long table across runs, and a wide summary per run.

A *run* is one evaluated model (a method, its calibration sources and a target
sparsity; the dense model is method ``dense`` at sparsity 0), its rows gathered from
its ``perplexity``, ``choice`` and ``speed`` artifacts (column ``artifact`` names the
artifact of each row). Runs of one method
with different calibration sets are labelled ``method [src+src]`` so they plot as
separate lines. In-distribution (``in``) perplexity means the evaluated source was a
calibration source of that run; everything else, and every multiple-choice task,
is out-of-distribution (``ood``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from gprune.eval.results import COLUMNS, tag_for

RUN_COLUMNS = {"run": "string", "artifact": "string", "model": "string", "method": "string",
               "calibration": "string", "label": "string", "target_sparsity": "float64"}
DENSE = "dense"


def long_table(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """Concatenate runs into one table (run columns + result columns), sorted.

    Each run is ``{"run", "model", "method", "target_sparsity", "calibration_sources":
    [...], "results": DataFrame}`` (``run``: the model's identity; ``results`` may carry
    an ``artifact`` column); tags are recomputed from the run's calibration sources.
    """
    frames = []
    for run in runs:
        frame = run["results"].copy()
        if "artifact" not in frame:
            frame["artifact"] = ""
        calibration = sorted(run.get("calibration_sources") or [])
        frame["tag"] = [tag_for(k, n, calibration) for k, n in zip(frame["kind"], frame["name"])]
        sparsity = run.get("target_sparsity")
        frame = frame.assign(
            run=run["run"], model=str(run.get("model") or ""),
            method=str(run.get("method") or "unknown"), calibration="+".join(calibration),
            target_sparsity=0.0 if run.get("method") == DENSE else _float(sparsity))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=list(RUN_COLUMNS) + list(COLUMNS))
    table["label"] = _labels(table)
    table = table[list(RUN_COLUMNS) + list(COLUMNS)].astype({**RUN_COLUMNS, **COLUMNS})
    order = table["method"].ne(DENSE)  # dense first
    return (table.assign(_o=order).sort_values(["_o", "label", "target_sparsity", "kind", "name"],
                                               kind="stable")
            .drop(columns="_o").reset_index(drop=True))


def _labels(table: pd.DataFrame) -> list[str]:
    sets = table.groupby("method")["calibration"].nunique().to_dict()
    return [m if m == DENSE or sets.get(m, 1) <= 1 or not c else f"{m} [{c}]"
            for m, c in zip(table["method"], table["calibration"])]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def geo_mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run: per-source perplexity, in/ood geo-means, task accuracy, size, speed."""
    rows = []
    for _run, run in table.groupby("run", sort=False):
        first = run.iloc[0]
        row: dict[str, Any] = {"method": first["label"], "calibration": first["calibration"],
                               "sparsity": first["target_sparsity"]}
        ppl = run[run["kind"] == "ppl"]
        row.update({f"ppl {n}": v for n, v in zip(ppl["name"], ppl["value"])})
        row["ppl in (geo)"] = geo_mean(ppl.loc[ppl["tag"] == "in", "value"])
        row["ppl ood (geo)"] = geo_mean(ppl.loc[ppl["tag"] == "ood", "value"])
        mc = run[run["kind"] == "mc"]
        row.update({f"{n} {m}": v for n, m, v in zip(mc["name"], mc["metric"], mc["value"])})
        for kind, name, column in (("size", "params", "params"),
                                   ("size", "flops_per_token", "FLOPs/token"),
                                   ("size", "gguf_bytes", "GGUF bytes"),
                                   ("speed", "prefill_tokens_per_s", "prefill tok/s"),
                                   ("speed", "decode_tokens_per_s", "decode tok/s")):
            hit = run[(run["kind"] == kind) & (run["name"] == name)]
            if len(hit):
                row[column] = float(hit["value"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def skipped_rows(table: pd.DataFrame) -> dict[str, int]:
    """Malformed rows skipped per task (the largest count seen across runs)."""
    mc = table[table["kind"] == "mc"]
    return {str(k): int(v) for k, v in mc.groupby("name")["skipped"].max().items()}


def in_ood_series(table: pd.DataFrame) -> pd.DataFrame:
    """Geo-mean perplexity over in- and out-of-distribution sources per (label, sparsity).

    The dense run is added to every line at sparsity 0, tagged with that line's
    calibration sources, so each line starts from the dense reference.
    """
    ppl = table[table["kind"] == "ppl"]
    dense = ppl[ppl["method"] == DENSE]
    rows = []
    for label, line in ppl[ppl["method"] != DENSE].groupby("label"):
        calibration = set(filter(None, line["calibration"].iloc[0].split("+")))
        points = [(s, g) for s, g in line.groupby("target_sparsity")]
        if len(dense):
            ref = dense.assign(tag=["in" if n in calibration else "ood" for n in dense["name"]])
            points.insert(0, (0.0, ref))
        for sparsity, group in points:
            for tag in ("in", "ood"):
                value = geo_mean(group.loc[group["tag"] == tag, "value"])
                rows.append({"label": label, "sparsity": sparsity, "tag": tag, "ppl": value})
    return pd.DataFrame(rows, columns=["label", "sparsity", "tag", "ppl"])
