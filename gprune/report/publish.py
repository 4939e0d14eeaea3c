"""Publish a rendered report folder as Prefect artifacts when inside a Prefect run.

Keys are stable so every run's report appears under the same artifact names:
``gprune-report`` (the Markdown) and ``gprune-results`` (the per-run summary table).
Outside a flow or task run this does nothing and returns False; Prefect is only
imported here, never by the rest of the library.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

MARKDOWN_KEY = "gprune-report"
TABLE_KEY = "gprune-results"


def table_records(report_dir: Path) -> list[dict]:
    """The summary table of a report folder as JSON-safe records (NaN -> None)."""
    frame = pd.read_csv(Path(report_dir) / "summary.csv")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def _in_run() -> bool:
    try:
        from prefect.context import get_run_context
        from prefect.exceptions import MissingContextError
    except ImportError:
        return False
    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def publish_attribution(folder: str | Path, name: str) -> bool:
    """The summary of an attribution artifact folder as the Markdown artifact
    ``gprune-attribution-<name>`` (lowercase, dashes), with its page's path; False outside
    a run."""
    if not _in_run():
        return False
    import re

    from prefect.artifacts import create_markdown_artifact

    folder = Path(folder)
    text = (folder / "summary.md").read_text(encoding="utf-8")
    text += f"\nPage: `{folder / 'attribution.html'}`\n"
    key = "gprune-attribution-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    create_markdown_artifact(markdown=text, key=key,
                             description=f"NSA attribution of {name} ({folder.name})")
    return True


def publish_to_prefect(report_dir: str | Path) -> bool:
    """Create the Markdown and table artifacts of ``report_dir``; False outside a run."""
    if not _in_run():
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report_dir = Path(report_dir)
    create_markdown_artifact(markdown=(report_dir / "report.md").read_text(encoding="utf-8"),
                             key=MARKDOWN_KEY, description=f"gprune report ({report_dir.name})")
    create_table_artifact(table=table_records(report_dir), key=TABLE_KEY,
                          description="gprune results: one row per evaluated checkpoint")
    return True
