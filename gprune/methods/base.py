"""A pruning method: typed parameters and what it needs, scores and allocates.

A method is one class in one module. It declares

- ``name`` and ``Params`` (a pydantic model: every parameter, its type, default and
  help; validated when the method is built, one-line error naming the parameter);
- ``needs``: the statistics its stages read (``STATISTICS`` lists what the pipeline
  computes; a method needing anything else is refused before any work starts);
- ``partition_config()``: how units are grouped into modules (K=1: no partition);
- ``score_settings()`` and ``score_units(units, modules_of_units, **settings)``: how
  units are scored (pure; the score stage's key covers the method name and settings,
  so methods or ablations with equal settings share one score artifact);
- ``allocator`` (a name in ``gprune.methods.allocators``) and ``reconstruct`` (its
  weight reconstruction at surgery: none, bias or lsq; lsq adds "gram" to its needs);
  ``serves_all_targets``: whether one learned artifact (the path) serves every target.

Defining a subclass with a ``name`` registers it (``METHODS``); a third-party package
registers its methods by exposing their module under the entry-point group
``gprune.methods``. A method spec is a name, ``name:key=value,key=value``, or a dict
``{"name": ..., key: value}``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gprune.configs.partition import PartitionConfig
from gprune.configs.score import ScoreConfig
from gprune.configs.surgery import Reconstruct
from gprune.errors import ConfigError
from gprune.maths.score import score_units
from gprune.methods.allocators import allocator as allocator_class
from gprune.methods.importance import importance, signal_of

STATISTICS = frozenset({"moments", "weights", "gram", "contexts"})  # capture, stats, gram, contexts
METHODS: dict[str, type["Method"]] = {}


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def reconstruct_field(default: Reconstruct):
    """The ``reconstruct`` parameter with a method's own default."""
    return Field(default, description="weight reconstruction at surgery: none, bias (FLAP) "
                                      "or lsq (least-squares refit of the kept columns from "
                                      "Gram statistics)")


class ReconstructionParams(MethodParams):
    """Parameters of a method's weight reconstruction (override ``reconstruct``'s default)."""

    reconstruct: Reconstruct = reconstruct_field("none")
    ridge: float = Field(1e-3, gt=0, le=10,
                         description="lsq damping, relative to the kept Gram's mean diagonal")


class Method:
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"moments", "weights"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in METHODS and METHODS[cls.name].__qualname__ != cls.__qualname__:
                raise ConfigError(f"method {cls.name!r} is registered twice")
            METHODS[cls.name] = cls

    def __init__(self, **params: Any) -> None:
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            where = f"parameter {where}: " if where else ""
            raise ConfigError(f"method {self.name}: {where}{message}; "
                              f"parameters: {', '.join(self.Params.model_fields)}") from None
        if self.kl_check and self.reconstruct != "lsq":
            raise ConfigError(f"method {self.name}: kl_check compares plans after the lsq "
                              "refit; set reconstruct=lsq or kl_check=false")
        if self.reconstruct == "lsq" or allocator_class(self.allocator).needs_gram:
            self.needs = self.needs | {"gram"}   # this instance's needs
        missing = self.needs - STATISTICS
        if missing:
            raise ConfigError(f"method {self.name} needs statistics this pipeline does not "
                              f"compute: {', '.join(sorted(missing))}")

    # ---- identity ---------------------------------------------------------------------
    def changed(self) -> dict[str, Any]:
        """Parameters that differ from their defaults (JSON values)."""
        default = self.Params().model_dump(mode="json")
        return {k: v for k, v in self.params.model_dump(mode="json").items() if default[k] != v}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.changed()}

    @property
    def label(self) -> str:
        """``name`` or ``name:key=value,...`` (the changed parameters): tables, plan names."""
        changed = self.changed()
        if not changed:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_text(v)}" for k, v in changed.items())

    # ---- what the stages ask --------------------------------------------------------
    def partition_config(self) -> PartitionConfig:
        return PartitionConfig(k=1, metric=signal_of("wanda_sp"))

    def score_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def score_config(self) -> ScoreConfig:
        return ScoreConfig(method=self.name, settings=self.score_settings())

    @classmethod
    def score_units(cls, units: pd.DataFrame, modules_of_units: pd.DataFrame,
                    **settings: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(scores, modules) tables; default: ``gprune.maths.score.score_units`` with
        ``metric`` (an importance criterion), ``aggregate``, ``gate``, ``q_sigma``, ``q_m``."""
        metric = settings.pop("metric")
        criterion = importance(metric)
        return score_units(units, modules_of_units,
                           metric if criterion.uses_activations else None,
                           signal_of(metric), **settings)

    @property
    def allocator(self) -> str:
        return getattr(self.params, "allocator", "uniform")

    @property
    def reconstruct(self) -> str:
        return getattr(self.params, "reconstruct", "none")

    @property
    def ridge(self) -> float:
        return getattr(self.params, "ridge", 1e-3)

    @property
    def prunes_heads(self) -> bool:
        """Whether the method may remove attention heads (the run's --prune-attention too)."""
        return getattr(self.params, "heads", True)

    @property
    def kl_check(self) -> bool:
        """Whether the allocate stage checks the plan against the uniform MLP-only plan."""
        return getattr(self.params, "kl_check", False)

    @property
    def refine_steps(self) -> int:
        """First-order refinement steps of the MLP channel counts (``gprune.maths.refine``;
        the path stage with the learned path, else the allocate stage)."""
        return getattr(self.params, "refine", 0)

    def check_model(self, shape, allocate, choice=None) -> None:
        """One-line ConfigError when the method cannot run on a model of ``shape`` with the
        allocation settings ``allocate`` (an AllocateConfig) and the run's multiple-choice
        evaluation ``choice`` (a ChoiceConfig or None); called before any work."""

    def allocator_params(self) -> dict[str, Any]:
        """The method's own settings of its allocator (``AllocateConfig.allocator_params``)."""
        return {}

    @property
    def serves_all_targets(self) -> bool:
        return allocator_class(self.allocator).uses_path

    @property
    def needs_sources(self) -> int:
        """Calibration sources the method needs (2 for distribution sensitivity)."""
        return 1


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
