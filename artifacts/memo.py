"""An in-process memo of tensors read from artifact files, bounded in bytes.

A sweep's targets run in one process and read the same artifact files again (the allocate
stage's KL check and the surgery of every target read every layer's pooled Gram). Entries
are keyed by what identifies the files read (path, inode, modification time), so a file
replaced under the same name is read again. The least recently used entries leave first;
a value larger than the budget is returned and not kept. Callers must not modify a tensor
they get from it.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Hashable

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
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The memoized value of ``key``, else ``read()`` (kept when it fits the budget)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = read()
        size = value.numel() * value.element_size()
        if size > self.budget:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += size
            while self._bytes > self.budget:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
