"""Config of the allocation stage: the only stage that depends on the target sparsity."""
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from gprune.configs.base import StageConfig
from gprune.maths.learned import LearnSettings
from gprune.maths.learned_path import DEFAULT_GRID, PathSettings

LEARN_FIELDS = ("steps", "lr", "penalty", "t_start", "t_end", "n_sequences", "seq_len",
                "batch_size")
DEFAULT_STEPS = {"learned_path": PathSettings.steps, "learned": LearnSettings.steps}


class AllocateConfig(StageConfig):
    sparsity: float = Field(..., gt=0, lt=1, description="fraction of prunable parameters removed")
    allocator: str = Field(
        "learned_path", description="a gprune.methods.allocators name; learned_path: one "
        "learning run serves every target; learned: one learning run per target; "
        "uniform / flap: no learning")
    prune_attention: bool = True
    mlp_floor: float = Field(0.1, gt=0, le=1, description="min fraction of MLP channels per layer")
    # learned allocators
    steps: Optional[int] = Field(None, ge=1, description="Adam steps (None: 48 path, 30 per target)")
    lr: float = Field(0.1, gt=0)
    penalty: float = Field(50.0, gt=0)
    t_start: float = Field(0.05, gt=0)
    t_end: float = Field(0.01, gt=0)
    n_sequences: int = Field(8, ge=1, description="calibration sequences for the KL objective")
    seq_len: int = Field(128, ge=8)
    batch_size: int = Field(2, ge=1)
    path_grid: tuple[float, ...] = Field(DEFAULT_GRID, min_length=1,
                                         description="targets the learned path trains on")
    ridge: float = Field(1e-3, gt=0, le=10, description="refit damping (refit_error allocator, "
                                                        "kl_check)")
    kl_check: bool = Field(False, description="measure the plan's KL to dense after the lsq "
                           "refit on held-apart calibration batches; keep the uniform MLP-only "
                           "plan instead when its KL is lower (needs Gram statistics)")
    check_sequences: int = Field(16, ge=1, description="kl_check: calibration sequences (drawn "
                                 "with seed + 1: not the learning batches, not the Gram's)")
    check_seq_len: int = Field(256, ge=8, description="kl_check: tokens per sequence (more, "
                               "shorter sequences let its sequential test stop sooner at the "
                               "same tokens; measured with heads kept: docs/METHOD_NOTES.md)")
    check_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="kl_check: the pruned copies' matrix products (auto: bfloat16 "
        "where the device has native bfloat16, e.g. AMX CPUs and CUDA GPUs, else float32; "
        "the dense side stays float32; gprune.maths.precision)")
    refine_steps: int = Field(0, ge=0, le=8, description="kl_check: first-order steps that "
                              "move each layer's MLP channel count by the refit model's "
                              "calibration KL before the check (gprune.maths.refine); 0: off")
    refine_extra: float = Field(0.05, gt=0, lt=1, description="refine: the channels added to "
                                "each layer in the estimate, and the largest move of a step "
                                "in standard deviations, as a fraction of the layer's channels")
    refine_sequences: int = Field(16, ge=1, description="refine: calibration sequences "
                                  "(drawn with seed + 2: not the check's)")
    refine_seq_len: int = Field(128, ge=8, description="refine: tokens per sequence")
    allocator_params: dict = Field(default_factory=dict, description="the method's own "
                                   "settings of its allocator (e.g. gisp's schedule); part "
                                   "of the path's and the plan's key when not empty")
    seed: int = 0
    device: str = "auto"
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="the learned allocators' training and the kl_check "
        "layer-streamed, one decoder layer's weights on the device at a time (auto: when "
        "the model does not fit; docs/SCALE.md); not in the key")

    @model_validator(mode="after")
    def _temperatures(self):
        if self.t_end > self.t_start:
            raise ValueError("t_end must not exceed t_start (the temperature anneals down)")
        return self

    @field_validator("allocator")
    @classmethod
    def _allocator(cls, name: str) -> str:
        from gprune.methods.allocators import allocator

        allocator(name)
        return name

    @field_validator("path_grid")
    @classmethod
    def _grid(cls, grid: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s < 1 for s in grid):
            raise ValueError(f"path_grid sparsities must lie in (0, 1); got {list(grid)}")
        return tuple(sorted(set(grid)))

    @property
    def learn_steps(self) -> int:
        return self.steps or DEFAULT_STEPS.get(self.allocator, LearnSettings.steps)

    def key_params(self) -> dict:
        """Parameters that shape the plan (device does not; a path artifact carries its own)."""
        params = self.params()
        for name in ("device", "stream", "path_grid", *(LEARN_FIELDS if self.allocator != "learned" else ())):
            params.pop(name)
        if self.allocator == "learned":
            params["steps"] = self.learn_steps
        from gprune.methods.allocators import allocator

        if not self.kl_check:
            for name in ("kl_check", "check_sequences", "check_seq_len", "check_precision"):
                params.pop(name)
        if not (self.kl_check and self.refine_steps):
            for name in ("refine_steps", "refine_extra", "refine_sequences", "refine_seq_len"):
                params.pop(name)
        if not (allocator(self.allocator).needs_gram or self.kl_check):
            params.pop("ridge")
        if not self.allocator_params:
            params.pop("allocator_params")
        return params

    def check_config(self) -> "AllocateConfig":
        """The settings of kl_check's batches (``tasks.learning.learning_inputs``)."""
        return self.model_copy(update={"n_sequences": self.check_sequences,
                                       "seq_len": self.check_seq_len, "seed": self.seed + 1})

    def refine_config(self) -> "AllocateConfig":
        """The settings of the refinement's batches (other sequences than the check's)."""
        return self.model_copy(update={"n_sequences": self.refine_sequences,
                                       "seq_len": self.refine_seq_len, "seed": self.seed + 2})

    def learn_settings(self) -> dict:
        """Settings of a learning allocator (LearnSettings / PathSettings fields)."""
        return dict(steps=self.learn_steps, lr=self.lr, penalty=self.penalty,
                    t_start=self.t_start, t_end=self.t_end)

    def path_params(self) -> dict:
        """Parameters that shape the learned path (every target shares them)."""
        params = {name: getattr(self, name) for name in LEARN_FIELDS}
        params.update(steps=self.learn_steps, path_grid=list(self.path_grid),
                      prune_attention=self.prune_attention, seed=self.seed)
        if self.allocator != "learned_path":   # (learned_path keys stay as they were)
            from gprune.methods.allocators import allocator

            params["allocator"] = self.allocator
            if allocator(self.allocator).needs_gram:
                params.update(ridge=self.ridge, mlp_floor=self.mlp_floor)
        if self.allocator_params:
            params.update(allocator_params=self.allocator_params, mlp_floor=self.mlp_floor)
        if self.path_refines:
            params.update(refine_steps=self.refine_steps, refine_extra=self.refine_extra,
                          refine_sequences=self.refine_sequences, ridge=self.ridge,
                          refine_seq_len=self.refine_seq_len, check_precision=self.check_precision,
                          mlp_floor=self.mlp_floor)
        return params

    @property
    def path_refines(self) -> bool:
        """Whether the path stage refines its fractions at every grid point (learned_path
        with kl_check and refine_steps, every head kept): the targets then share it."""
        return (self.allocator == "learned_path" and self.kl_check and self.refine_steps > 0
                and not self.prune_attention)
