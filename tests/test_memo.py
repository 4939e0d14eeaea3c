"""The in-process memo of artifact reads: bounded in bytes, least recently used out first
(its use for pooled Grams: tests/test_gram.py)."""
from __future__ import annotations

import torch

from artifacts.memo import TensorMemo, default_budget


def test_memo_keeps_within_its_budget_and_evicts_the_least_recently_used():
    memo, reads = TensorMemo(budget_bytes=3 * 800), []

    def read(name):
        def load():
            reads.append(name)
            return torch.zeros(100, dtype=torch.float64)           # 800 bytes
        return load

    first = memo.get("a", read("a"))
    assert memo.get("a", read("a")) is first and reads == ["a"]
    memo.get("b", read("b"))
    memo.get("c", read("c"))
    memo.get("a", read("a"))                                      # a is now the most recent
    memo.get("d", read("d"))                                      # evicts b
    memo.get("a", read("a"))
    memo.get("b", read("b"))
    assert reads == ["a", "b", "c", "d", "b"]
    big = memo.get("big", lambda: torch.zeros(1000, dtype=torch.float64))
    assert big.numel() == 1000 and memo.get("big", lambda: torch.ones(1)).numel() == 1  # not kept
    assert 0 < default_budget() <= 2**31


def test_memo_counts_the_tensors_of_tuples_and_dataclasses():
    from artifacts.memo import nbytes
    from gprune.maths.refit import Refit

    pair = (torch.zeros(10, dtype=torch.float64), [torch.zeros(5, dtype=torch.float32), 3.0])
    assert nbytes(pair) == 80 + 20
    refit = Refit(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                  0.0, 1.0, torch.zeros(4, dtype=torch.float64))
    assert nbytes(refit) == 8 * (12 + 4 + 4)
    memo = TensorMemo(budget_bytes=150)
    memo.get("refit", lambda: refit)                              # 160 bytes: not kept
    assert memo.get("refit", lambda: pair) is pair
    assert memo.get("refit", lambda: refit) is pair               # 100 bytes: kept
