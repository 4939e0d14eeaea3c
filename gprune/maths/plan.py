"""The pruning plan: which MLP channels, query heads and KV groups every layer keeps.

``PruningPlan`` is what the allocator writes (``plan.json``, see docs/ARCHITECTURE.md)
and what surgery reads. Parameter counts use only the prunable projections (MLP and
attention weights; no biases, norms or embeddings):

- an MLP channel costs ``(3 if gated else 2) * hidden``,
- a query head costs ``2 * hidden * head_dim`` (its q rows and o columns),
- a KV group costs ``2 * hidden * head_dim`` (its k and v rows).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gprune.errors import ArtifactError, ConfigError
from gprune.models.adapters import ModelShape

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class LayerPlan:
    """Kept units of one decoder layer; all index tuples sorted ascending."""

    layer: int
    mlp_keep: tuple[int, ...]
    heads_keep: tuple[int, ...]
    kv_keep: tuple[int, ...]

    @classmethod
    def dense(cls, shape: ModelShape, layer: int) -> "LayerPlan":
        """A layer that keeps everything."""
        return cls(layer, tuple(range(shape.intermediate)), tuple(range(shape.heads)),
                   tuple(range(shape.kv_heads)))

    @classmethod
    def from_heads(cls, layer: int, mlp_keep, heads_keep, shape: ModelShape) -> "LayerPlan":
        """Derive ``kv_keep`` from the kept query heads (the groups that keep one)."""
        heads = tuple(sorted(int(h) for h in heads_keep))
        kv = tuple(sorted({h // shape.group_size for h in heads}))
        return cls(layer, tuple(sorted(int(c) for c in mlp_keep)), heads, kv)

    def kept_params(self, shape: ModelShape) -> int:
        return shape.layer_params(len(self.mlp_keep), len(self.heads_keep), len(self.kv_keep))

    def check(self, shape: ModelShape) -> None:
        """Raise ConfigError when the layer's keep sets are not a valid structured mask."""
        where = f"plan layer {self.layer}"
        _check_indices(self.mlp_keep, shape.intermediate, f"{where} mlp_keep")
        _check_indices(self.heads_keep, shape.heads, f"{where} heads_keep")
        _check_indices(self.kv_keep, shape.kv_heads, f"{where} kv_keep")
        groups = [h // shape.group_size for h in self.heads_keep]
        if sorted(set(groups)) != list(self.kv_keep):
            raise ConfigError(f"{where}: kv_keep must be exactly the KV groups of the kept "
                              "query heads; rebuild the plan")
        counts = {groups.count(g) for g in self.kv_keep}
        if len(counts) > 1:
            raise ConfigError(f"{where}: every kept KV group must keep the same number of "
                              "query heads; rebuild the plan")


RECONSTRUCTIONS = ("none", "bias", "lsq")


@dataclass(frozen=True)
class PruningPlan:
    """A whole-model plan; derived counts are computed, never trusted from the file."""

    model_fingerprint: str
    family: str
    method: str
    target_sparsity: float
    dense: ModelShape
    layers: tuple[LayerPlan, ...]
    reconstruct: str = "none"             # none | bias | lsq: the method's reconstruction
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- counts ------------------------------------------------------------
    @property
    def prunable_params(self) -> int:
        return prunable_params(self.dense)

    @property
    def kept_prunable_params(self) -> int:
        return kept_params(self)

    @property
    def achieved_sparsity(self) -> float:
        return achieved_sparsity(self)

    # ---- (de)serialization -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            "model_fingerprint": self.model_fingerprint, "family": self.family,
            "method": self.method, "target_sparsity": float(self.target_sparsity),
            "achieved_sparsity": round(self.achieved_sparsity, 6),
            "prunable_params": self.prunable_params,
            "kept_prunable_params": self.kept_prunable_params,
            "dense": asdict(self.dense), "reconstruct": self.reconstruct,
            "layers": [{"layer": lp.layer, "mlp_keep": list(lp.mlp_keep),
                        "heads_keep": list(lp.heads_keep), "kv_keep": list(lp.kv_keep)}
                       for lp in self.layers],
        }
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        """Parse plan.json text; a malformed plan raises ArtifactError."""
        try:
            raw = json.loads(text)
            plan = cls(
                model_fingerprint=str(raw["model_fingerprint"]), family=str(raw["family"]),
                method=str(raw["method"]), target_sparsity=float(raw["target_sparsity"]),
                dense=ModelShape(**raw["dense"]),
                layers=tuple(LayerPlan(int(lp["layer"]), _ints(lp["mlp_keep"]),
                                       _ints(lp["heads_keep"]), _ints(lp["kv_keep"]))
                             for lp in raw["layers"]),
                reconstruct=str(raw.get("reconstruct")
                                or ("bias" if raw.get("bias_compensation") else "none")),
                extra=dict(raw.get("extra", {})))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"plan.json is malformed ({err!r}); rerun the plan stage") from err
        plan.check()
        return plan

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, folder_or_file: str | Path) -> "PruningPlan":
        path = Path(folder_or_file)
        path = path / PLAN_FILE if path.is_dir() else path
        try:
            return cls.from_json(path.read_text())
        except OSError as err:
            raise ArtifactError(f"cannot read plan {path} ({err}); rerun the plan stage") from err

    # ---- validation --------------------------------------------------------
    def check(self) -> None:
        """Internal consistency: one entry per layer, in order, each a valid mask."""
        if [lp.layer for lp in self.layers] != list(range(self.dense.num_layers)):
            raise ConfigError(f"plan must list layers 0..{self.dense.num_layers - 1} in order; "
                              "rebuild the plan")
        if self.reconstruct not in RECONSTRUCTIONS:
            raise ConfigError(f"plan reconstruct must be one of {', '.join(RECONSTRUCTIONS)}; "
                              f"got {self.reconstruct!r}")
        for lp in self.layers:
            lp.check(self.dense)

    def validate_against(self, shape: ModelShape, fingerprint: str) -> None:
        """Refuse a plan made for another model (fingerprint or shape differ)."""
        if fingerprint != self.model_fingerprint:
            raise ConfigError(
                f"plan was made for model {self.model_fingerprint} but this model is "
                f"{fingerprint}; make a plan for this model first")
        if shape != self.dense:
            raise ConfigError(f"plan's dense shape {self.dense} does not match the model's "
                              f"{shape}; make a plan for this model first")
        self.check()


def prunable_params(shape: ModelShape) -> int:
    """Prunable parameters of the dense model (MLP + attention projection weights)."""
    return shape.num_layers * LayerPlan.dense(shape, 0).kept_params(shape)


def kept_params(plan: PruningPlan) -> int:
    """Prunable parameters the plan keeps."""
    return sum(lp.kept_params(plan.dense) for lp in plan.layers)


def achieved_sparsity(plan: PruningPlan) -> float:
    """Fraction of the prunable parameters the plan removes."""
    total = prunable_params(plan.dense)
    return 1.0 - kept_params(plan) / total if total else 0.0


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _check_indices(values: tuple[int, ...], size: int, what: str) -> None:
    if list(values) != sorted(set(values)) or any(v < 0 or v >= size for v in values):
        raise ConfigError(f"{what} must be sorted unique indices in [0, {size}); "
                          "rebuild the plan")
