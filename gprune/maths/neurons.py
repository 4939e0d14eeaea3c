"""Neuron-word matching (NSA, arXiv 2503.01542, step 2): the words that activate each MLP
channel and each attention query head of a dense model most, over a text corpus.

Words and their tokens: ``gprune.maths.words`` (a word split into several tokens is
matched by its strongest token). Activations:

- MLP channel c: |a_c|, a the input of the MLP output projection (after the gate);
- attention query head h: the L2 norm of its ``head_dim`` slice of the input of the
  attention output projection (what the head writes, before the projection).

Streaming: per unit the top ``pool`` word-token activations seen so far are kept
(``TopK``: values and global position ids, (pool, units)), never the full activation
matrix; ``distinct_words`` then keeps each unit's best ``top_words`` distinct words, and
``Profile`` also the unit's mean activation over all word tokens (for selectivity).
``MeanAbs`` (the attribution's activation shift) keeps per-unit means instead. The
hooks are registered inside ``UnitPass``'s ``with`` and always removed (``HookedPass``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pandas as pd
import torch
from torch import nn

from gprune.maths.hooked import HookedPass
from gprune.maths.words import Encoded


@dataclass
class TopK:
    """Per unit, the ``pool`` largest values seen and their global position ids."""

    pool: int
    units: int
    values: torch.Tensor = field(init=False)      # (pool, units)
    positions: torch.Tensor = field(init=False)   # (pool, units) int64, -1 = empty

    def __post_init__(self):
        self.values = torch.full((self.pool, self.units), float("-inf"))
        self.positions = torch.full((self.pool, self.units), -1, dtype=torch.long)

    def update(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        """``acts`` (n, units) at global ``positions`` (n,)."""
        if acts.shape[0] == 0:
            return
        values = torch.cat([self.values, acts.float().cpu()])                 # (pool+n, units)
        ids = torch.cat([self.positions, positions.cpu()[:, None].expand(-1, self.units)])
        k = min(self.pool, values.shape[0])
        top, where = values.topk(k, dim=0)                                    # (k, units)
        self.values[:k], self.positions[:k] = top, ids.gather(0, where)


class MeanAbs:
    """Per unit, the mean activation over the positions fed (sum and count)."""

    def __init__(self, units: int):
        self.sum = torch.zeros(units, dtype=torch.float64)   # (units,)
        self.count = 0

    def update(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        self.sum += acts.double().sum(0).cpu()
        self.count += int(acts.shape[0])

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


Block = tuple[Optional[nn.Module], Optional[nn.Module], int]   # (mlp_out, attn_out, heads)


class UnitPass(HookedPass):
    """Hooks on every layer's MLP and attention output projections (``blocks``: per layer
    (mlp_out, attn_out, heads), None where a pruned layer has no such module) feeding one
    accumulator per layer and kind (``make(units)``: ``TopK`` or ``MeanAbs``) with the
    activations of word tokens only. The hook lifecycle is ``HookedPass``'s."""

    def __init__(self, model: nn.Module, blocks: list[Block], make: Callable[[int], Any]):
        super().__init__(model, next(model.parameters()).device)
        self.blocks = blocks
        self.acc = {(i, kind): make(mod.in_features if kind == "mlp" else heads)
                    for i, (mlp, attn, heads) in enumerate(blocks)
                    for kind, mod in (("mlp", mlp), ("attn", attn)) if mod is not None}
        self._positions: Optional[torch.Tensor] = None   # (B, T) global ids, -1 off words

    def _register(self) -> None:
        for (i, kind) in self.acc:
            mlp, attn, heads = self.blocks[i]
            module = mlp if kind == "mlp" else attn
            self._track(module.register_forward_pre_hook(self._hook(i, kind, heads)))

    def first_non_finite(self) -> None:
        return None   # top-k words and means: nothing accumulates a NaN to stop on

    def _hook(self, layer: int, kind: str, heads: int):
        def hook(_module, args):
            x = args[0]                                                    # (B, T', d)
            # the pass may have cut trailing padding columns: T' <= T
            positions = self._positions[:, :x.shape[1]].reshape(-1)       # (B*T',)
            words = positions >= 0
            flat = x.reshape(-1, x.shape[-1])[words.to(x.device)]         # (n, d)
            if kind == "attn":
                flat = flat.view(flat.shape[0], heads, -1).norm(dim=-1)    # (n, heads)
            self.acc[(layer, kind)].update(flat.abs(), positions[words])
        return hook

    def forward_words(self, ids: torch.Tensor, mask: torch.Tensor,
                      positions: torch.Tensor) -> None:
        """One batch: ``ids``/``mask`` (B, T), ``positions`` (B, T) global ids, -1 for
        tokens outside any word (never fed) and padding."""
        self._positions = positions
        try:
            self.forward(ids, mask)
        finally:
            self._positions = None


def run_units(model: nn.Module, blocks: list[Block], encoded: Encoded, batch_size: int,
              make: Callable[[int], Any]) -> dict[tuple[int, str], Any]:
    """Feed ``encoded``'s word tokens to one accumulator per (layer, kind)."""
    with UnitPass(model, blocks, make) as units:
        for start in range(0, encoded.ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            units.forward_words(encoded.ids[rows], encoded.mask[rows], encoded.positions[rows])
    return units.acc


class Profile:
    """A unit's ``TopK`` word tokens and its mean activation over every word token."""

    def __init__(self, pool: int, units: int):
        self.top, self.mean = TopK(pool, units), MeanAbs(units)

    def update(self, acts: torch.Tensor, positions: torch.Tensor) -> None:
        self.top.update(acts, positions)
        self.mean.update(acts, positions)


def match_units(model: nn.Module, blocks: list[Block], encoded: Encoded, batch_size: int,
                pool: int, top_words: int) -> pd.DataFrame:
    """Every unit's best ``top_words`` distinct words over ``encoded``'s texts, with its
    mean activation over all their word tokens and each word's selectivity (activation /
    that mean: how much more the word drives the unit than a typical word does)."""
    acc = run_units(model, blocks, encoded, batch_size, lambda units: Profile(pool, units))
    frame = distinct_words({k: a.top for k, a in acc.items()}, encoded.words, top_words)
    means = pd.concat([pd.DataFrame({"layer": k[0], "kind": k[1], "unit": range(len(m)),
                                     "mean": m.float().numpy()})
                       for k, m in ((k, a.mean.mean()) for k, a in sorted(acc.items()))])
    frame = frame.merge(means.astype({"layer": "int32", "unit": "int32"}),
                        on=["layer", "kind", "unit"], how="left")
    return frame.assign(selectivity=(frame["activation"] / frame["mean"].clip(lower=1e-12))
                        .astype("float32"))


def distinct_words(top: dict[tuple[int, str], TopK], words: dict[int, tuple],
                   top_words: int) -> pd.DataFrame:
    """Per unit its best ``top_words`` distinct words: one row (layer, kind, unit, rank,
    word, activation, doc, start, end) each; ``words``: position id -> (word, doc, start,
    end) of the word that token belongs to."""
    rows = []
    for (layer, kind), tk in sorted(top.items()):
        values, positions = tk.values.T.tolist(), tk.positions.T.tolist()  # (units, pool)
        for unit, (vals, pos) in enumerate(zip(values, positions)):
            seen: set[str] = set()
            for value, p in zip(vals, pos):
                if p < 0 or len(seen) >= top_words:
                    break
                word, doc, start, end = words[p]
                if word in seen:
                    continue
                seen.add(word)
                rows.append((layer, kind, unit, len(seen) - 1, word, value, doc, start, end))
    frame = pd.DataFrame(rows, columns=["layer", "kind", "unit", "rank", "word", "activation",
                                        "doc", "start", "end"])
    return frame.astype({"layer": "int32", "unit": "int32", "rank": "int32",
                         "activation": "float32", "doc": "int32", "start": "int32",
                         "end": "int32"})
