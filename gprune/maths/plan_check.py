"""A plan's cost measured on the model: KL to the dense model after surgery and refit.

An allocator proposes a plan from proxies (scores, a learned path, refit errors). The check
applies the plan with its reconstruction to a copy of the dense model and measures

    KL = mean over predicted tokens of KL(p_dense || p_pruned)

on calibration batches that were not used for fitting (the Grams come from the capture's
tokens; the batches are drawn with other seeds). ``choose_plan`` keeps the candidate unless
the reference (the uniform MLP-only plan with the same refit: every head kept, the same
fraction of MLP channels in every layer) has a lower KL: a plan is then never worse on the
calibration objective than that hand-made plan at the same budget.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from gprune.maths.learned import kl_to_dense
from gprune.maths.plan import PruningPlan
from gprune.maths.surgery import Fits, apply_plan
from gprune.models.adapters import FamilyAdapter
from gprune.models.pruned import finalize

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def pruned_copy(dense: nn.Module, adapter: FamilyAdapter, plan: PruningPlan,
                fits: Fits | None) -> nn.Module:
    """A pruned (and refit) copy of ``dense``; ``dense`` is left as it is."""
    model = copy.deepcopy(dense)
    return finalize(model, adapter, apply_plan(model, adapter, plan, fits))


@torch.no_grad()
def calibration_kl(dense: nn.Module, student: nn.Module, batches: Batches) -> float:
    """Token-weighted mean KL(dense || student) over the predicted tokens of ``batches``."""
    device = next(dense.parameters()).device
    total, tokens = 0.0, 0
    for input_ids, attention_mask in batches:
        ids, mask = input_ids.to(device), attention_mask.to(device)
        teacher = torch.log_softmax(dense(input_ids=ids, attention_mask=mask).logits[:, :-1]
                                    .float(), -1)                          # (B, T-1, V)
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        predicted = mask[:, 1:].float()                                    # (B, T-1)
        count = int(predicted.sum())
        if count:
            total += float(kl_to_dense(logits, teacher, predicted)) * count
            tokens += count
    if tokens == 0:
        raise ValueError("no predicted tokens in the calibration batches")
    return total / tokens


def choose_plan(candidate: PruningPlan, reference: PruningPlan,
                kl_of: Callable[[PruningPlan], float]) -> tuple[PruningPlan, dict]:
    """The plan with the lower calibration KL (the candidate on a tie) and the record
    {"candidate": KL, "reference": KL, "chosen": "candidate" | "reference"}."""
    if _same_units(candidate, reference):
        kl = kl_of(candidate)
        return candidate, {"candidate": kl, "reference": kl, "chosen": "candidate"}
    kl_candidate, kl_reference = kl_of(candidate), kl_of(reference)
    chosen = "candidate" if kl_candidate <= kl_reference else "reference"
    record = {"candidate": kl_candidate, "reference": kl_reference, "chosen": chosen}
    return (candidate if chosen == "candidate" else reference), record


def _same_units(a: PruningPlan, b: PruningPlan) -> bool:
    return all((x.mlp_keep, x.heads_keep) == (y.mlp_keep, y.heads_keep)
               for x, y in zip(a.layers, b.layers, strict=True))
