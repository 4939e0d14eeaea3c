"""A plan's cost measured on the model: KL to the dense model after surgery and refit.

An allocator proposes a plan from proxies (scores, a learned path, refit errors). The check
applies the plan with its reconstruction to a copy of the dense model and measures

    KL = mean over predicted tokens of KL(p_dense || p_pruned)

on calibration batches that were not used for fitting (the Grams come from the capture's
tokens; the batches are drawn with other seeds). ``choose_plan`` keeps the candidate unless
the reference (the uniform MLP-only plan with the same refit: every head kept, the same
fraction of MLP channels in every layer) has a lower KL: a plan is then never worse on the
calibration objective than that hand-made plan at the same budget.

Cost: both plans are built layer by layer together (one Gram read per layer serves both)
and measured on one pass over the batches; the dense side comes from a ``Teacher`` (the
dense final hidden states, computed once and shared by every target of a sweep).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from gprune.maths.learned import kl_to_dense
from gprune.maths.plan import PruningPlan
from gprune.maths.surgery import Fits, check_dense, prune_layer
from gprune.models.adapters import FamilyAdapter
from gprune.models.pruned import finalize

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def pruned_copies(dense: nn.Module, adapter: FamilyAdapter, plans: list[PruningPlan],
                  fits: Fits | None) -> list[nn.Module]:
    """A pruned (and refit) copy of ``dense`` per plan; ``dense`` is left as it is.
    Layer by layer across the plans, so a Gram read for one layer serves every plan."""
    models = [copy.deepcopy(dense) for _ in plans]
    for model, plan in zip(models, plans):
        check_dense(model, adapter, plan)
    layers = [adapter.decoder_layers(model) for model in models]
    sizes: list[list[dict]] = [[] for _ in plans]
    for index in range(adapter.shape(dense.config).num_layers):
        for model_layers, plan, layer_sizes in zip(layers, plans, sizes):
            layer_sizes.append(prune_layer(model_layers[index], adapter, plan.layers[index],
                                           plan.dense, fits))
    return [finalize(model, adapter, layer_sizes) for model, layer_sizes in zip(models, sizes)]


def pruned_copy(dense: nn.Module, adapter: FamilyAdapter, plan: PruningPlan,
                fits: Fits | None) -> nn.Module:
    """A pruned (and refit) copy of ``dense``; ``dense`` is left as it is."""
    return pruned_copies(dense, adapter, [plan], fits)[0]


@dataclass(frozen=True)
class Teacher:
    """The dense model's final hidden states on the check batches, one (B, T, d) tensor per
    batch (the output head turns them into the dense logits), or None where the head alone
    does not reproduce the model's logits (then the dense model runs again per check)."""

    hidden: list[torch.Tensor] | None


@torch.no_grad()
def dense_teacher(dense: nn.Module, batches: Batches) -> Teacher:
    """Run ``dense`` once over ``batches`` and keep what its logits need."""
    head, device = dense.get_output_embeddings(), next(dense.parameters()).device
    hidden = []
    for input_ids, attention_mask in batches:
        out = dense(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    output_hidden_states=True)
        last = out.hidden_states[-1]                                       # (B, T, d)
        if head is None or not torch.allclose(head(last), out.logits, rtol=1e-4, atol=1e-4):
            return Teacher(None)        # e.g. a final norm or soft-cap after the hidden states
        hidden.append(last.cpu())
    return Teacher(hidden)


class KlMeans:
    """Per student, the running token-weighted mean of KL(dense || student) over the
    predicted tokens of the batches added (what both the in-memory and the streamed check
    report)."""

    def __init__(self, students: int):
        self.totals, self.tokens = [0.0] * students, 0

    def add(self, dense_logits: Callable[[], torch.Tensor],
            student_logits: Callable[[int], torch.Tensor], attention_mask: torch.Tensor) -> None:
        """One batch: ``dense_logits()`` and ``student_logits(i)`` give (B, T, V) logits,
        called only when the batch has predicted tokens."""
        predicted = attention_mask[:, 1:].float()                          # (B, T-1)
        count = int(predicted.sum())
        if not count:
            return
        log_p = torch.log_softmax(dense_logits()[:, :-1].float(), -1)      # (B, T-1, V)
        for i in range(len(self.totals)):
            logits = student_logits(i)[:, :-1]                             # (B, T-1, V)
            self.totals[i] += float(kl_to_dense(logits, log_p, predicted)) * count
        self.tokens += count

    def means(self) -> list[float]:
        if self.tokens == 0:
            raise ValueError("no predicted tokens in the calibration batches")
        return [total / self.tokens for total in self.totals]


@torch.no_grad()
def calibration_kls(dense: nn.Module, students: list[nn.Module], batches: Batches,
                    teacher: Teacher | None = None) -> list[float]:
    """Per student, the token-weighted mean KL(dense || student) over the predicted
    tokens of ``batches``; the dense side from ``teacher`` when it has hidden states."""
    device = next(dense.parameters()).device
    head = dense.get_output_embeddings()
    kls = KlMeans(len(students))
    for index, (input_ids, attention_mask) in enumerate(batches):
        ids, mask = input_ids.to(device), attention_mask.to(device)
        kls.add(lambda: (head(teacher.hidden[index].to(device))
                         if teacher is not None and teacher.hidden is not None
                         else dense(input_ids=ids, attention_mask=mask).logits),
                lambda i: students[i](input_ids=ids, attention_mask=mask).logits, mask)
    return kls.means()


def calibration_kl(dense: nn.Module, student: nn.Module, batches: Batches) -> float:
    """Token-weighted mean KL(dense || student) over the predicted tokens of ``batches``."""
    return calibration_kls(dense, [student], batches)[0]


def choose_plan(candidate: PruningPlan, reference: PruningPlan,
                kls_of: Callable[[list[PruningPlan]], list[float]]) -> tuple[PruningPlan, dict]:
    """The plan with the lower calibration KL (the candidate on a tie) and the record
    {"candidate": KL, "reference": KL, "chosen": "candidate" | "reference"};
    ``kls_of(plans)``: their KLs, measured together."""
    if _same_units(candidate, reference):
        kl = kls_of([candidate])[0]
        return candidate, {"candidate": kl, "reference": kl, "chosen": "candidate"}
    kl_candidate, kl_reference = kls_of([candidate, reference])
    chosen = "candidate" if kl_candidate <= kl_reference else "reference"
    record = {"candidate": kl_candidate, "reference": kl_reference, "chosen": chosen}
    return (candidate if chosen == "candidate" else reference), record


def _same_units(a: PruningPlan, b: PruningPlan) -> bool:
    return all((x.mlp_keep, x.heads_keep) == (y.mlp_keep, y.heads_keep)
               for x, y in zip(a.layers, b.layers, strict=True))
