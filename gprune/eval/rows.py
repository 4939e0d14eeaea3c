"""A normalized multiple-choice row and its validation (every task parser's last step)."""
from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def validate_row(raw: Any) -> Row | None:
    """A normalized row if ``raw`` is one: non-empty query, >= 2 distinct non-empty
    choices, an integer ``gold`` indexing them; else None."""
    if not isinstance(raw, dict):
        return None
    query, choices, gold = raw.get("query"), raw.get("choices"), raw.get("gold")
    if not isinstance(query, str) or not query.strip():
        return None
    if not isinstance(choices, list) or len(choices) < 2 or len(set(map(str, choices))) < len(choices):
        return None
    if not all(isinstance(c, str) and c.strip() for c in choices):
        return None
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        return None
    return {"query": query, "choices": choices, "gold": gold}
