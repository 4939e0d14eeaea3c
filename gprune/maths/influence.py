"""Influential words (NSA, arXiv 2503.01542, step 1): the words of a task's inputs whose
removal most changes the model's prediction.

Leave-one-word-out on the answer's log-probability: for an input with query q, options
o_1..o_m and gold g, the score is s(q) = log softmax_j LL(o_j | q) at g (LL: the summed
log-likelihood of the option's tokens, the choice stage's cloze). A word w of q has the
influence s(q) - s(q without w): positive when w supported the right answer. Exact (no
gradient linearisation, no embedding-space baseline), model-agnostic (pruned checkpoints
and any family), at the cost of one scoring per word (``max_inputs`` bounds it).

Words in text that every input shares (the task's template, e.g. "Review:" or
"Answer:") are not input semantics: ``variable_regions`` leaves the common prefix and
suffix of the queries out, and the caller may skip function words (``stop_words``: they
appear in most inputs, so their small, noisy deltas add up). ``rank_words`` aggregates the inputs into one ranked list:
a word's influence is the sum of |delta| over its occurrences divided by the inputs.
"""
from __future__ import annotations

import os
from typing import Callable

import pandas as pd
import torch
from torch import nn

from gprune.maths.words import WORD, word_spans

Scorer = Callable[[list[tuple[int, str]]], torch.Tensor]   # (input, query) -> scores (n,)


def variable_regions(queries: list[str]) -> list[tuple[int, int]]:
    """Per query, the (start, end) chars outside the prefix and suffix all queries share
    (cut at word boundaries); the whole query when there are fewer than two."""
    if len(queries) < 2:
        return [(0, len(q)) for q in queries]
    prefix = len(os.path.commonprefix(queries))
    suffix = len(os.path.commonprefix([q[::-1] for q in queries]))
    regions = []
    for q in queries:
        lo, hi = prefix, max(prefix, len(q) - suffix)
        while lo > 0 and WORD.match(q[lo - 1]):          # a word cut by the prefix: keep it
            lo -= 1
        while hi < len(q) and WORD.match(q[hi]):
            hi += 1
        regions.append((lo, hi))
    return regions


def without(query: str, start: int, end: int) -> str:
    """``query`` with the chars [start, end) and one adjacent space removed."""
    if end < len(query) and query[end] == " ":
        end += 1
    elif start > 0 and query[start - 1] == " ":
        start -= 1
    return query[:start] + query[end:]


def leave_one_out(queries: list[str], score: Scorer,
                  skip: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Rows (input, word, start, end, delta): delta = s(q) - s(q without the word), for
    every word occurrence in each query's variable region (words in ``skip``: none)."""
    items, words, base_of = [], [], []
    for i, (query, (lo, hi)) in enumerate(zip(queries, variable_regions(queries))):
        base_of.append(len(items))
        items.append((i, query))
        for start, end, word in word_spans(query[lo:hi]):
            if word in skip:
                continue
            words.append((i, word, lo + start, lo + end, len(items)))
            items.append((i, without(query, lo + start, lo + end)))
    scores = score(items).double()                                     # (len(items),)
    rows = [(i, word, start, end, float(scores[base_of[i]] - scores[at]))
            for i, word, start, end, at in words]
    return pd.DataFrame(rows, columns=["input", "word", "start", "end", "delta"])


def rank_words(deltas: pd.DataFrame, inputs: int) -> pd.DataFrame:
    """One row per word: influence (sum |delta| / inputs), mean delta, inputs it occurs in,
    rank (0 = most influential)."""
    if deltas.empty:
        return pd.DataFrame(columns=["word", "influence", "mean_delta", "inputs", "rank"])
    grouped = deltas.assign(abs_delta=deltas["delta"].abs()).groupby("word")
    table = pd.DataFrame({"influence": grouped["abs_delta"].sum() / max(inputs, 1),
                          "mean_delta": grouped["delta"].mean(),
                          "inputs": grouped["input"].nunique()}).reset_index()
    table = table.sort_values(["influence", "word"], ascending=[False, True], kind="stable")
    return table.assign(rank=range(len(table))).reset_index(drop=True)


@torch.inference_mode()
def gold_log_probs(model: nn.Module, tokenizer, items: list[tuple[int, str]],
                   choices: list[list[str]], gold: list[int], batch_size: int) -> torch.Tensor:
    """s(q) per (input, query) item: log softmax over the input's options of their summed
    token log-likelihoods after the query, at the gold option. (n,) float64."""
    pairs = [(n, q, j, c) for n, (i, q) in enumerate(items) for j, c in enumerate(choices[i])]
    ll = torch.zeros(len(items), max(len(c) for c in choices), dtype=torch.float64)
    ll.fill_(float("-inf"))
    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [(tokenizer(q, add_special_tokens=False)["input_ids"],
                 tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for _, q, _, c in chunk]
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)               # (B, T)
        mask = torch.zeros_like(ids)
        for r, (a, b) in enumerate(seqs):
            ids[r, :len(a) + len(b)], mask[r, :len(a) + len(b)] = torch.tensor(a + b), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, ((n, _, j, _), (a, b)) in enumerate(zip(chunk, seqs)):
            steps = torch.arange(len(a) - 1, len(a) + len(b) - 1)
            logp = logits[r, steps.to(device)].double().log_softmax(-1).cpu()   # (len b, V)
            ll[n, j] = logp[torch.arange(len(b)), torch.tensor(b)].sum()
    gold_t = torch.tensor([gold[i] for i, _ in items])
    return ll.log_softmax(-1).gather(1, gold_t[:, None]).squeeze(1)          # (n,)
