"""Words and their tokens (NSA, arXiv 2503.01542): what the attribution calls a word.

A *word* is a maximal run of letters, digits and apostrophes (``WORD``), lowercased; a
token belongs to the word its characters overlap (the tokenizer's offsets), so a word
split into several tokens is matched by its strongest token. ``encode_texts`` tokenizes
texts into padded batches with, per token, a global position id (-1 outside any word and
on padding) and the table position id -> (word, text index, start, end).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# words that carry grammar, not content (scikit-learn's English list), less negations,
# which carry sentiment; with the pieces of split contractions
NEGATIONS = frozenset({"no", "not", "nor", "never", "neither", "none", "nothing", "nobody",
                       "noone", "nowhere", "cannot"})


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return (frozenset(ENGLISH_STOP_WORDS) - NEGATIONS) | {"s", "t", "d", "ll", "re", "ve", "m"}


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, lowercased word; curly apostrophes as ') of every word of ``text``."""
    return [(m.start(), m.end(), m.group().lower().replace("’", "'"))
            for m in WORD.finditer(text)]


def token_words(offsets: list[tuple[int, int]], spans: list[tuple[int, int, str]]) -> list[int]:
    """Per token (char offsets), the index of the word it overlaps in ``spans``, else -1."""
    out, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        out.append(j if j < len(spans) and end > start and spans[j][0] < end else -1)
    return out


@dataclass
class Encoded:
    ids: torch.Tensor         # (N, L) int64, right-padded
    mask: torch.Tensor        # (N, L) int64
    positions: torch.Tensor   # (N, L) int64 global position ids, -1 off words / padding
    words: dict[int, tuple[str, int, int, int]]   # position -> (word, text, start, end)
    texts: list[str]          # the texts as far as their tokens were kept

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def encode_texts(texts: list[str], tokenizer, seq_len: int, max_tokens: int,
                 keep: set[str] | None = None) -> Encoded:
    """Tokenize ``texts`` in order (each cut at ``seq_len`` tokens) until ``max_tokens``;
    ``keep``: only these words get position ids (the others -1, as tokens off words)."""
    rows, words, kept = [], {}, []
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:min(seq_len, max_tokens - total)]
        if not ids:
            continue
        offsets = enc["offset_mapping"][:len(ids)]
        spans = word_spans(text)
        index = len(kept)
        positions = []
        for t, w in enumerate(token_words(offsets, spans)):
            if w < 0 or (keep is not None and spans[w][2] not in keep):
                positions.append(-1)
                continue
            pos = total + t
            words[pos] = (spans[w][2], index, spans[w][0], spans[w][1])
            positions.append(pos)
        rows.append((ids, positions))
        kept.append(text[:offsets[-1][1]])
        total += len(ids)
    width = max((len(ids) for ids, _ in rows), default=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (row, pos) in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        positions[i, :len(pos)] = torch.tensor(pos)
    return Encoded(ids, mask, positions, words, kept)
