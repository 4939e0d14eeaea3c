"""Allocators by name: how many units each module keeps at one target sparsity.

An allocator turns unit scores into continuous keep fractions per MLP module and per
layer's attention (``gprune.maths.allocate.Fractions``); the allocate stage then
projects them onto the exact budget and keeps the best-scored units. ``uses_path``:
the allocator reads a learned path (the ``path`` stage, learned once for every
target); ``needs_model``: its fractions run the model (loaded by the stage through
``AllocationInputs.learning``; the path stage always does); ``needs_gram``: it reads
the calibration Grams (``AllocationInputs.grams``; a method using it needs "gram"). Register a new one with ``@register_allocator``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import pandas as pd

from gprune.errors import ConfigError
from gprune.maths.allocate import (Allocation, Fractions, flap_fractions, project,
                                   uniform_fractions)
from gprune.maths.fisher import output_fisher
from gprune.maths.learned import LearnSettings, learn_fractions
from gprune.maths.learned_path import PathSettings, learn_path, path_fractions
from gprune.maths.refit_allocate import ladder_fractions, refit_ladders
from gprune.methods.named import Registry
from gprune.models.adapters import ModelShape

# () -> (model, adapter, calibration batches); loads the dense model when called
Learning = Callable[[], tuple[Any, Any, list]]


@dataclass(frozen=True)
class AllocationInputs:
    scores: pd.DataFrame           # the score stage's table
    shape: ModelShape
    sparsity: float
    prune_attention: bool
    learn: dict                    # learning settings (AllocateConfig.learn_settings())
    path_table: Optional[pd.DataFrame] = None   # uses_path allocators: the path stage's table
    learning: Optional[Learning] = None         # needs_model allocators
    grams: Optional[Callable[[int, str], Any]] = None  # needs_gram: (layer, kind) -> Gram
    ridge: float = 1e-2                         # needs_gram: the refit's damping
    mlp_floor: float = 0.1                      # min fraction of MLP channels per layer
    params: dict = field(default_factory=dict)  # the method's allocator_params
    # (sequences, seq_len) -> (model, adapter, [[batch, ...] per source]); path stage only
    sources: Optional[Callable[[int, int], tuple[Any, Any, list]]] = None
    # (task, items) -> (model, adapter, questions of the task's training split); path stage
    task_items: Optional[Callable[[str, int], tuple[Any, Any, list]]] = None


class Allocator:
    name: ClassVar[str]
    uses_path: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False
    needs_gram: ClassVar[bool] = False

    @classmethod
    def fractions(cls, inputs: AllocationInputs) -> tuple[Fractions, list[float]]:
        """Keep fractions at ``inputs.sparsity`` and the objective history (may be empty)."""
        raise NotImplementedError

    @classmethod
    def allocation(cls, fractions: Fractions, inputs: AllocationInputs) -> Allocation:
        """Integer keep counts meeting the budget (default: ``project`` the fractions)."""
        return project(fractions, inputs.shape, inputs.sparsity, inputs.mlp_floor,
                       inputs.prune_attention)

    @classmethod
    def ranked(cls, scores: pd.DataFrame, inputs: AllocationInputs) -> pd.DataFrame:
        """The scores ``harden`` keeps the best of in each module (default: as scored)."""
        return scores


ALLOCATORS: Registry[Allocator] = Registry("allocator")
register_allocator = ALLOCATORS.register
allocator = ALLOCATORS.lookup
AllocatorName = ALLOCATORS.name_type()  # a method parameter's type


@register_allocator
class Uniform(Allocator):
    """The same keep fraction in every module (Wanda-sp, magnitude)."""

    name = "uniform"

    @classmethod
    def fractions(cls, inputs):
        return uniform_fractions(inputs.scores, inputs.shape, inputs.sparsity,
                                 inputs.prune_attention), []


@register_allocator
class GlobalThreshold(Allocator):
    """FLAP's global threshold on standardized scores (layers get what they score)."""

    name = "flap"

    @classmethod
    def fractions(cls, inputs):
        return flap_fractions(inputs.scores, inputs.shape, inputs.sparsity,
                              inputs.prune_attention), []


@register_allocator
class Learned(Allocator):
    """Keep fractions learned for one target (KL to the dense model; METHOD.md stage 5)."""

    name = "learned"
    needs_model = True

    @classmethod
    def fractions(cls, inputs):
        model, adapter, batches = inputs.learning()
        settings = LearnSettings(prune_attention=inputs.prune_attention, **inputs.learn)
        return learn_fractions(model, adapter, inputs.shape, inputs.scores, batches,
                               inputs.sparsity, settings)


@register_allocator
class LearnedPath(Allocator):
    """One learned path of keep fractions over a grid of targets; every target reads it."""

    name = "learned_path"
    uses_path = True

    @classmethod
    def learn(cls, inputs: AllocationInputs, grid: tuple[float, ...]
              ) -> tuple[pd.DataFrame, list[float]]:
        """The path table (the path stage's artifact) and the objective history."""
        model, adapter, batches = inputs.learning()
        settings = PathSettings(grid=grid, prune_attention=inputs.prune_attention, **inputs.learn)
        return learn_path(model, adapter, inputs.shape, inputs.scores, batches, settings)

    @classmethod
    def fractions(cls, inputs):
        if inputs.path_table is None:
            raise ConfigError("the learned_path allocator needs a path: run the path stage "
                              "first (gprune stage path) and pass its key")
        return path_fractions(inputs.path_table, inputs.scores, inputs.shape, inputs.sparsity,
                              inputs.prune_attention), []


@register_allocator
class RefitError(Allocator):
    """Spend the budget where the least-squares refit leaves the least error, priced by
    the loss's Fisher (``gprune.maths.fisher``) on the calibration batches: heads and MLP
    channels compared by their measured effect (``gprune.maths.refit_allocate``). Its path
    is the table of every layer's error ladder: computed once, read at any target."""

    name = "refit_error"
    uses_path = True
    needs_gram = True

    @classmethod
    def learn(cls, inputs: AllocationInputs, grid: tuple[float, ...]
              ) -> tuple[pd.DataFrame, list[float]]:
        if inputs.grams is None:
            raise ConfigError("the refit_error allocator needs Gram statistics: run the gram "
                              "stage for the calibration sources first and pass their keys")
        model, adapter, batches = inputs.learning()
        layers = adapter.decoder_layers(model)
        fisher = output_fisher(model, adapter, batches)     # per layer {kind: (hidden,)}

        def maps(layer: int, kind: str):
            out = (adapter.mlp_output if kind == "mlp" else adapter.attn_output)(layers[layer])
            return out.weight, out.bias

        table = refit_ladders(inputs.scores, inputs.shape, inputs.prune_attention,
                              inputs.grams, maps, lambda layer, kind: fisher[layer][kind],
                              inputs.ridge)
        return table, []

    @classmethod
    def fractions(cls, inputs):
        if inputs.path_table is None:
            raise ConfigError("the refit_error allocator reads its error ladders: run the path "
                              "stage first (gprune stage path) and pass its key")
        fractions, chosen = ladder_fractions(inputs.path_table, inputs.scores, inputs.shape,
                                             inputs.sparsity)
        return fractions, [{"layer": l, "kind": k, "keep": f, "error": e}
                           for l, k, f, e in chosen]


@register_allocator
class FunctionalComplexity(Allocator):
    """FANG's block sparsity: blocks that change the hidden state more (1 - cosine) keep
    more, in [0.5 S, 1.5 S] averaged to S; inside a block the shared group keeps its floor
    and the context groups share the rest (``gprune.maths.fang.fang_fractions``)."""

    name = "fang"

    @classmethod
    def fractions(cls, inputs):
        from gprune.maths.fang import fang_fractions

        return fang_fractions(inputs.scores, inputs.shape, inputs.sparsity,
                              inputs.prune_attention), []
