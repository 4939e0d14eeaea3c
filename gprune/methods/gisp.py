"""GISP: global iterative structured pruning from loss gradients (arXiv 2510.18030,
"From Local to Global: Revisiting Structured Pruning Paradigms for LLMs"; reference code
uncc-efficient-ai/GISP).

Every MLP channel and query head is scored by |W * dL/dW| summed over its weights and
divided by its parameter count (``gprune.maths.gisp_taylor``); all structures outside
the protected layers meet in one global ranking; the pruned fraction rises from 0 to the
path grid's largest target in ``steps`` rounds, each rescoring the masked model
(``gprune.maths.gisp``). The trajectory is the path stage's artifact: one order of
removals, so every target's plan is a prefix of it (nested), read off without a
re-projection. Reconstruction is off by default (the paper uses none); ``reconstruct=lsq``
refits the kept columns like every method. The score stage only supplies the unit table
(Wanda-sp scores, unused by the plan).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional

import pandas as pd
from pydantic import Field, model_validator

from gprune.configs.surgery import Reconstruct
from gprune.errors import ConfigError
from gprune.maths.allocate import Allocation, Fractions, module_sizes
from gprune.maths.gisp import (NEVER, GispSettings, allocation_of, check_settings, kept_at,
                               trajectory, trajectory_end)
from gprune.methods.allocators import Allocator, AllocationInputs, register_allocator
from gprune.methods.base import Method, ReconstructionParams, reconstruct_field


class GispParams(ReconstructionParams):
    steps: int = Field(12, ge=1, description="rounds of rescoring from 0 to the path grid's "
                       "largest target (the paper uses many more; each costs a backward "
                       "pass over the calibration batches)")
    protect_first: float = Field(0.1, ge=0, lt=1, description="fraction of the first layers "
                                 "never pruned")
    protect_last: int = Field(1, ge=0, description="last layers never pruned")
    sources: Literal["pooled", "per_source"] = Field(
        "pooled", description="one gradient over all calibration tokens, or each source "
        "scored alone, scaled to unit mean per layer and averaged")
    objective: Literal["perplexity", "margin"] = Field(
        "perplexity", description="next-token loss on the calibration sources, or the margin "
        "(correct answer's loss minus the wrong ones') on a multiple-choice task's training split")
    task: Optional[str] = Field(None, description="margin: the task (siqa_local, mmlu_local, "
                                "or a .jsonl task with a <stem>.train.jsonl next to it)")
    items: int = Field(64, ge=1, description="margin: training questions the gradients use")
    sequences: int = Field(16, ge=1, description="calibration sequences the gradients use")
    seq_len: int = Field(256, ge=8, description="tokens per calibration sequence")
    heads: bool = Field(True, description="may remove query heads (whatever the run's "
                        "--prune-attention says, false keeps them)")
    reconstruct: Reconstruct = reconstruct_field("none")

    @model_validator(mode="after")
    def _task(self):
        if self.objective == "margin":
            from gprune.eval.mc_tasks import training_rows

            if not self.task:
                raise ValueError("objective=margin needs task=<a multiple-choice task>")
            training_rows(self.task)          # a one-line error when it has no training split
        elif self.task:
            raise ValueError("task is only read by objective=margin")
        return self


class Gisp(Method):
    name = "gisp"
    summary = "GISP: global iterative |W*grad| ranking, nested masks from one trajectory"
    Params = GispParams

    def score_settings(self) -> dict:
        return {"metric": "wanda_sp", "aggregate": "pooled", "gate": False}

    @property
    def allocator(self) -> str:
        return "gisp"

    def check_model(self, shape, allocate, choice=None) -> None:
        """Protected layers leave something to prune; the trajectory's end (the path grid's
        largest target) and every target fit what they leave; a margin task's evaluated
        items stay clear of its training split."""
        p = self.params
        if p.objective == "margin" and choice is not None and p.task in choice.mc_tasks:
            from gprune.eval.mc_tasks import training_rows

            _, clear = training_rows(p.task)
            if choice.mc_limit > clear:
                raise ConfigError(f"method {self.label}: --mc-limit {choice.mc_limit} would "
                                  f"evaluate {p.task} items its training split holds; use at "
                                  f"most {clear}")
        settings = GispSettings(steps=p.steps, protect_first=p.protect_first,
                                protect_last=p.protect_last, floor=allocate.mlp_floor,
                                prune_attention=allocate.prune_attention)
        try:
            check_settings(shape, replace(settings, end=0.0))
        except ValueError as err:
            raise ConfigError(f"method {self.label}: {err}") from None
        end = trajectory_end(shape, settings, max(allocate.path_grid))
        if allocate.sparsity > end + 1e-9:
            raise ConfigError(f"method {self.label}: target {allocate.sparsity:.2f} lies beyond "
                              f"the trajectory, which ends at {end:.2f} (the path grid's "
                              "largest target, or what the protected layers and floors allow)")

    def allocator_params(self) -> dict:
        p = self.params
        return {"steps": p.steps, "protect_first": p.protect_first,
                "protect_last": p.protect_last, "sources": p.sources,
                "sequences": p.sequences, "seq_len": p.seq_len, "objective": p.objective,
                **(self._margin_key() if p.objective == "margin" else {})}

    def _margin_key(self) -> dict:
        from gprune.eval.mc_tasks import training_digest

        return {"task": self.params.task, "items": self.params.items,
                "task_digest": training_digest(self.params.task)}


@register_allocator
class GispAllocator(Allocator):
    """GISP's trajectory (the path stage) and its prefix at each target."""

    name = "gisp"
    uses_path = True

    @classmethod
    def settings(cls, inputs: AllocationInputs, end: float) -> GispSettings:
        p = inputs.params
        return GispSettings(steps=p["steps"], end=end, protect_first=p["protect_first"],
                            protect_last=p["protect_last"], floor=inputs.mlp_floor,
                            prune_attention=inputs.prune_attention)

    @classmethod
    def learn(cls, inputs: AllocationInputs, grid: tuple[float, ...]
              ) -> tuple[pd.DataFrame, list[dict]]:
        import logging

        from tqdm.auto import tqdm

        from gprune.maths.gisp_taylor import masked_scores

        settings = cls.settings(inputs, 0.0)
        try:
            check_settings(inputs.shape, settings)
        except ValueError as err:
            raise ConfigError(f"gisp: {err}") from None
        settings = replace(settings, end=trajectory_end(inputs.shape, settings, max(grid)))
        p, objective = inputs.params, inputs.params["objective"]
        if objective == "margin":
            model, adapter, items = inputs.task_items(p["task"], p["items"])
            sources = [items]
        else:
            model, adapter, sources = inputs.sources(p["sequences"], p["seq_len"])
        log = logging.getLogger("gprune")

        def scores(alive_mlp, alive_heads):
            return masked_scores(model, adapter, inputs.shape, alive_mlp, alive_heads, sources,
                                 p["sources"], objective)

        bar = tqdm(total=settings.steps, desc="gisp schedule", unit="step")

        def progress(step: int, info: dict) -> None:
            device = next(model.parameters()).device
            if device.type == "cuda":                          # memory printed on a GPU
                import torch

                peak = torch.cuda.max_memory_allocated(device)   # the model's GPU, not cuda:0
                info["gpu_peak_gib"] = round(peak / 2**30, 2)
                log.info("gisp step %d: peak GPU memory %.2f GiB", step, info["gpu_peak_gib"])
            bar.update(1)
            bar.set_postfix(pruned=f"{info['pruned']:.3f}", loss=f"{info['loss']:.3f}",
                            s_per_step=info["seconds"])
            log.info("gisp step %d/%d: pruned %.3f (goal %.3f), loss %.4f, %.1fs", step,
                     settings.steps, info["pruned"], info["goal"], info["loss"], info["seconds"])

        try:
            return trajectory(inputs.shape, settings, scores, progress)
        finally:
            bar.close()

    @classmethod
    def _kept(cls, inputs: AllocationInputs, warn: bool = False) -> pd.DataFrame:
        if inputs.path_table is None:
            raise ConfigError("the gisp allocator reads its trajectory: run the path stage "
                              "first (gprune stage path --method gisp) and pass its key")
        try:
            kept = kept_at(inputs.path_table, inputs.shape, inputs.sparsity)
        except ValueError as err:
            raise ConfigError(f"gisp: {err}") from None
        if warn and not kept.nested.all():
            import logging

            logging.getLogger("gprune").warning(
                "gisp at %.2f: no prefix of the trajectory is within 0.5 pp of the target (its "
                "structures are coarse for this model); MLP channels fill the budget and this "
                "plan may not nest in the others", inputs.sparsity)
        return kept

    @classmethod
    def fractions(cls, inputs):
        kept = cls._kept(inputs)
        mlp = kept[kept.kind == "mlp"].groupby("layer").kept.mean()
        attn = kept[kept.kind == "attn"].groupby("layer").kept.mean()
        return Fractions({(int(l), 0): float(f) for l, f in mlp.items()},
                         module_sizes(inputs.scores),
                         {int(l): float(f) for l, f in attn.items()}), []

    @classmethod
    def allocation(cls, fractions, inputs) -> Allocation:
        """The trajectory's prefix exactly: no projection (it would break the nesting)."""
        return allocation_of(cls._kept(inputs, warn=True), inputs.shape)

    @classmethod
    def ranked(cls, scores, inputs) -> pd.DataFrame:
        """Scores replaced by the removal position (never removed: NEVER), so ``harden``
        keeps exactly the structures the prefix keeps."""
        order = inputs.path_table[["kind", "layer", "unit", "position"]]
        merged = scores.merge(order, on=["kind", "layer", "unit"], how="left")
        position = merged.position.fillna(NEVER).astype(float)
        return merged.assign(score=position, raw=position).drop(columns="position")
