"""A plan's cost measured on the model: KL to the dense model after surgery and refit.

An allocator proposes a plan from proxies (scores, a learned path, refit errors). The check
applies the plan with its reconstruction to a copy of the dense model and measures

    KL = mean over predicted tokens of KL(p_dense || p_pruned)

on calibration batches that were not used for fitting (the Grams come from the capture's
tokens; the batches are drawn with other seeds). ``choose_plan`` keeps the candidate unless
the reference (the uniform MLP-only plan with the same refit: every head kept, the same
fraction of MLP channels in every layer) has a lower KL: a plan is then never worse on the
calibration objective than that hand-made plan at the same budget.

The measurement is sequential: the batches come in rounds (one sequence per calibration
source each, at least 3 sequences), and it stops after the first round at which a paired
t-test over the per-sequence KLs (two-sided, 95%) says which plan is lower. The KLs are
then those of the sequences measured, and the record says how many.

Cost: both plans are built layer by layer together (one Gram read per layer serves both)
and measured on one pass over the batches; the dense side comes from a ``Teacher`` (the
dense final hidden states, computed once and shared by every target of a sweep, and the
KL's dense terms of as many batches as its byte budget holds).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from gprune.maths.plan import PruningPlan
from gprune.maths.surgery import Fits, check_dense, prune_layer
from gprune.models.adapters import FamilyAdapter
from gprune.models.pruned import finalize

Batches = list[tuple[torch.Tensor, torch.Tensor]]
CONFIDENCE = 0.95   # of the paired t-test that ends the check early


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
    does not reproduce the model's logits (then the dense model runs again per check).
    ``keep_bytes``: how much of the dense side's KL terms (``dense_terms``, vocabulary-sized)
    it may keep for the next check of the same batches (0: none)."""

    hidden: list[torch.Tensor] | None
    keep_bytes: int = 0
    kept: dict = field(default_factory=dict, compare=False, repr=False)  # number -> terms

    def terms(self, number: int, head: nn.Module, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``dense_terms`` of batch ``number`` (from its hidden states; ``self.hidden``
        must not be None)."""
        if number in self.kept:
            return self.kept[number]
        terms = dense_terms(head(self.hidden[number].to(device)))
        held = sum(p.numel() * p.element_size() for p, _ in self.kept.values())
        if held + terms[0].numel() * terms[0].element_size() <= self.keep_bytes:
            self.kept[number] = terms
        return terms


@torch.no_grad()
def dense_teacher(dense: nn.Module, batches: Batches, keep_bytes: int = 0) -> Teacher:
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
    return Teacher(hidden, keep_bytes)


def dense_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense side of the KL from its logits (B, T, V): the probabilities of the
    predicted positions p (B, T-1, V) and their negative entropy sum_v p log p (B, T-1)."""
    log_p = torch.log_softmax(logits[:, :-1].float(), -1)                  # (B, T-1, V)
    p = log_p.exp()                                                        # (B, T-1, V)
    return p, (p * log_p).sum(-1)


class SequenceKls:
    """Per student and per sequence (in batch order), KL(dense || student) summed over the
    sequence's predicted tokens, and the token counts: what both the in-memory and the
    streamed check accumulate, and what the sequential choice reads."""

    def __init__(self, students: int):
        self.sums: list[list[float]] = [[] for _ in range(students)]
        self.tokens: list[float] = []

    def add(self, dense: Callable[[], tuple[torch.Tensor, torch.Tensor]],
            student_logits: Callable[[int], torch.Tensor], attention_mask: torch.Tensor) -> None:
        """One batch: ``dense()`` gives the dense side's ``dense_terms`` and
        ``student_logits(i)`` (B, T, V) logits, called only when the batch has predicted
        tokens (a sequence without any counts zero tokens and zero KL, so sequences keep
        their batch order)."""
        predicted = attention_mask[:, 1:].float()                          # (B, T-1)
        counts = predicted.sum(1)                                          # (B,)
        self.tokens.extend(counts.tolist())
        if not int(counts.sum()):
            for sums in self.sums:
                sums.extend([0.0] * len(counts))
            return
        p, neg_entropy = dense()                                  # (B, T-1, V), (B, T-1)
        for index, sums in enumerate(self.sums):
            logits = student_logits(index)[:, :-1]                         # (B, T-1, V)
            sums.extend(kl_sums(logits, p, neg_entropy, predicted).tolist())

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, sequences: int) -> "SequenceKls":
        """The first ``sequences`` sequences' values."""
        first = SequenceKls(0)
        first.sums = [sums[:sequences] for sums in self.sums]
        first.tokens = self.tokens[:sequences]
        return first

    def means(self) -> list[float]:
        """Per student, the token-weighted mean KL over the predicted tokens."""
        total = sum(self.tokens)
        if total == 0:
            raise ValueError("no predicted tokens in the calibration batches")
        return [sum(sums) / total for sums in self.sums]

    def per_sequence(self, student: int) -> torch.Tensor:
        """(n,) mean KL per token of each sequence that has predicted tokens."""
        sums = torch.tensor(self.sums[student], dtype=torch.float64)
        tokens = torch.tensor(self.tokens, dtype=torch.float64)
        return sums[tokens > 0] / tokens[tokens > 0]


def kl_sums(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
            teacher_neg_entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per sequence, KL(dense || student) summed over its real (mask == 1) positions,
    as sum_v p log p - sum_v p log q, from the teacher's probabilities p (B, T, V) and
    negative entropy sum_v p log p (B, T), which every student of a batch shares
    (``learned.kl_to_dense`` is the training side's mean)."""
    logits = student_logits.float()                                          # (B, T, V)
    # sum_v p log q = sum_v p z - logsumexp(z), as sum_v p = 1 (no (B, T, V) log q made)
    cross = (teacher_probs * logits).sum(-1) - torch.logsumexp(logits, dim=-1)   # (B, T)
    return ((teacher_neg_entropy - cross) * mask).sum(-1)


def split_rounds(batches: Batches, per_round: int) -> list[Batches]:
    """``batches`` in consecutive rounds of at least ``per_round`` sequences each (the
    last round takes the remainder when it would be short)."""
    rounds, current, size = [], [], 0
    for batch in batches:
        current.append(batch)
        size += len(batch[0])
        if size >= per_round:
            rounds.append(current)
            current, size = [], 0
    if current:
        if rounds and size < per_round:
            rounds[-1].extend(current)
        else:
            rounds.append(current)
    return rounds


@torch.no_grad()
def calibration_rounds(dense: nn.Module, students: list[nn.Module], rounds: list[Batches],
                       teacher: Teacher | None = None) -> Iterator[SequenceKls]:
    """After each round of batches, the ``SequenceKls`` of every round so far; the dense
    side from ``teacher`` (its hidden states in the order of the rounds' batches) when it
    has hidden states."""
    device = next(dense.parameters()).device
    head = dense.get_output_embeddings()
    kls, number = SequenceKls(len(students)), 0
    for batches in rounds:
        for input_ids, attention_mask in batches:
            ids, mask = input_ids.to(device), attention_mask.to(device)
            kls.add(lambda: (teacher.terms(number, head, device)
                             if teacher is not None and teacher.hidden is not None
                             else dense_terms(dense(input_ids=ids, attention_mask=mask).logits)),
                    lambda i: students[i](input_ids=ids, attention_mask=mask).logits, mask)
            number += 1
        yield kls


def calibration_kls(dense: nn.Module, students: list[nn.Module], batches: Batches,
                    teacher: Teacher | None = None) -> list[float]:
    """Per student, the token-weighted mean KL(dense || student) over the predicted
    tokens of ``batches``; the dense side from ``teacher`` when it has hidden states."""
    *_, kls = calibration_rounds(dense, students, [batches], teacher)
    return kls.means()


def calibration_kl(dense: nn.Module, student: nn.Module, batches: Batches) -> float:
    """Token-weighted mean KL(dense || student) over the predicted tokens of ``batches``."""
    return calibration_kls(dense, [student], batches)[0]


def decisive(candidate: torch.Tensor, reference: torch.Tensor,
             confidence: float = CONFIDENCE) -> bool:
    """Paired per-sequence KLs (n,) of two plans: is their mean difference nonzero by a
    two-sided paired t-test at ``confidence`` (n >= 3)?"""
    from scipy.stats import t as student_t

    diff = reference - candidate                                           # (n,)
    n = diff.numel()
    if n < 3:
        return False
    spread = float(diff.std())
    if spread == 0.0:
        return float(diff.mean()) != 0.0
    statistic = abs(float(diff.mean())) / (spread / math.sqrt(n))
    return statistic > float(student_t.ppf(0.5 + confidence / 2, n - 1))


def choose_plan(candidate: PruningPlan, reference: PruningPlan,
                measure: Callable[[list[PruningPlan]], Iterable[SequenceKls]],
                confidence: float = CONFIDENCE) -> tuple[PruningPlan, dict]:
    """The plan with the lower calibration KL (the candidate on a tie) and the record
    {"candidate": KL, "reference": KL, "chosen": "candidate" | "reference",
    "sequences": measured, "decisive": whether the t-test settled it, "per_sequence": each
    plan's mean KL per measured sequence}.

    ``measure(plans)`` yields, after each round of check batches, the plans' per-sequence
    KLs so far. The measurement stops after the first round at which the paired
    per-sequence differences are decisive (``decisive``: which plan is lower is then
    settled at that confidence), else it takes every round. Identical plans are measured
    on one round."""
    if _same_units(candidate, reference):
        kls = next(iter(measure([candidate])))
        kl = kls.means()[0]
        return candidate, {"candidate": kl, "reference": kl, "chosen": "candidate",
                           "sequences": len(kls), "decisive": True}
    for kls in measure([candidate, reference]):
        settled = decisive(kls.per_sequence(0), kls.per_sequence(1), confidence)
        if settled:
            break
    kl_candidate, kl_reference = kls.means()
    chosen = "candidate" if kl_candidate <= kl_reference else "reference"
    record = {"candidate": kl_candidate, "reference": kl_reference, "chosen": chosen,
              "sequences": len(kls), "decisive": settled,
              "per_sequence": {side: [round(float(v), 6) for v in kls.per_sequence(i)]
                               for i, side in enumerate(("candidate", "reference"))}}
    return (candidate if chosen == "candidate" else reference), record


def _same_units(a: PruningPlan, b: PruningPlan) -> bool:
    return all((x.mlp_keep, x.heads_keep) == (y.mlp_keep, y.heads_keep)
               for x, y in zip(a.layers, b.layers, strict=True))
