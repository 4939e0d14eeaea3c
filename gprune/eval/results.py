"""Schema of evaluation results and the in-distribution / out-of-distribution tag.

One row per measured quantity:

| column | type | meaning |
|---|---|---|
| kind | string | ``ppl``, ``mc``, ``size`` or ``speed`` |
| name | string | corpus source, task, or size/speed quantity |
| metric | string | ``ppl``, ``acc``, ``acc_norm``, ``count``, ``bytes``, ``flops``, ``tokens_per_s``, ``ratio`` |
| value | float64 | the measurement |
| stderr | float64 | its standard error, NaN where none |
| n | int64 | scored tokens (ppl), examples (mc), tokens timed or repeats (speed), 0 (size) |
| skipped | int64 | malformed task rows skipped (mc), else 0 |
| tag | string | ``in`` / ``ood`` for ppl and mc, empty for size and speed |

Each evaluation stage writes its own kinds: ``perplexity`` the ``ppl`` and ``size`` rows,
``choice`` the ``mc`` rows, ``speed`` the ``speed`` rows: ``prefill_tokens_per_s`` and
``decode_tokens_per_s``; a pruned checkpoint's speed stage also times its dense source
model, interleaved with it, and adds ``prefill_speedup`` and ``decode_speedup`` (metric
``ratio``: pruned / dense tokens/s, median over the paired repeats).

A perplexity row is ``in`` when its source is one of the calibration sources of the
evaluated checkpoint, ``ood`` otherwise; multiple-choice tasks are always ``ood``
(no calibration source is a task set).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

COLUMNS = {"kind": "string", "name": "string", "metric": "string", "value": "float64",
           "stderr": "float64", "n": "int64", "skipped": "int64", "tag": "string"}
KINDS = ("ppl", "mc", "size", "speed")
RESULTS_FILE = "results.parquet"  # the file of an evaluation artifact holding the rows


def tag_for(kind: str, name: str, calibration_sources: Iterable[str]) -> str:
    """``in`` / ``ood`` for ppl and mc rows, ``""`` for size and speed."""
    if kind == "ppl":
        return "in" if name in set(calibration_sources) else "ood"
    return "ood" if kind == "mc" else ""


def record(kind: str, name: str, metric: str, value: float, stderr: float = math.nan,
           n: int = 0, skipped: int = 0, calibration_sources: Iterable[str] = ()) -> dict[str, Any]:
    """One result row, tagged."""
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}")
    return {"kind": kind, "name": name, "metric": metric, "value": float(value),
            "stderr": float(stderr), "n": int(n), "skipped": int(skipped),
            "tag": tag_for(kind, name, calibration_sources)}


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly the schema's columns and dtypes."""
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.astype(COLUMNS)
