"""An in-process memo of tensors read from artifact files (or computed from them), bounded in bytes.

A sweep's targets run in one process and read the same artifact files again (the allocate
stage's KL check and the surgery of every target read every layer's pooled Gram). Entries
are keyed by what identifies the files read (path, inode, modification time), so a file
replaced under the same name is read again. The least recently used entries leave first;
a value larger than the budget is returned and not kept. Callers must not modify a tensor
they get from it. A value may also be a tuple, list or dataclass of tensors (its size is
the sum of its tensors').
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch


def default_budget() -> int:
    """Bytes a memo may hold: 1/8 of the machine's memory, at most 2 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 2**33
    return min(2**31, physical // 8)


class TensorMemo:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], Any]) -> Any:
        """The memoized value of ``key``, else ``read()`` (kept when it fits the budget)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = read()
        size = nbytes(value)
        if size > self.budget:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += size
            while self._bytes > self.budget:
                _, old = self._entries.popitem(last=False)
                self._bytes -= nbytes(old)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def nbytes(value: Any) -> int:
    """Bytes held by the tensors of ``value`` (a tensor, or a tuple, list or dataclass of
    them; anything else counts 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0
