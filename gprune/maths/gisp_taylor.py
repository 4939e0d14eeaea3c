"""GISP's importance: first-order loss estimates |W * dL/dW| of the masked model's structures.

For an MLP channel c: the sum over its gate and up rows and its down column of
|W * dL/dW|; for a query head h: its q rows and o columns (under MHA also its k and v
rows, as the reference code does; under GQA k/v are shared and skipped). The gradient is
the mean over calibration tokens of the next-token loss (``perplexity``) or of a margin
loss over multiple-choice answers (``margin_loss``); sums over a structure are divided by
its parameter count, so a head and a channel compare per parameter. Masking: the inputs
of the MLP and attention output projections are multiplied by the alive masks (hooks,
always removed), so a removed structure's rows and columns get zero gradient.

Sources: ``pooled`` accumulates one gradient over every source's tokens (the reference);
``per_source`` scores each source with its own mean gradient, scales each source's
scores to unit mean per layer and kind, and averages them, so that no source dominates
(the GISP analogue of GPrune's module-local competition). Gradients are taken in the
model's dtype and accumulated in float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from gprune.maths.learned import next_token_loss, soft_masks
from gprune.models.adapters import FamilyAdapter, ModelShape

Batch = tuple[torch.Tensor, torch.Tensor]          # (ids (B, T), attention mask (B, T))


def margin_loss(choice_losses: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """GISP's margin objective: the loss of the correct answer minus the mean loss of the
    wrong ones, summed over questions. choice_losses (Q, C): each answer's summed token
    loss; correct (Q,) the right answer's index."""
    picked = torch.zeros_like(choice_losses, dtype=torch.bool)
    picked[torch.arange(len(correct)), correct] = True
    wrong = choice_losses.masked_fill(picked, 0).sum(1) / (choice_losses.shape[1] - 1)  # (Q,)
    return (choice_losses[picked] - wrong).sum()


def structure_scores(adapter: FamilyAdapter, layers: list, shape: ModelShape
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp (L, I), heads (L, H)) per-parameter |W * grad| from the weights' ``.grad``."""
    mlp, heads = [], []
    hd = shape.head_dim
    for layer in layers:
        channel = sum(_taylor(w).sum(1) for w in adapter.mlp_inputs(layer))           # (I,)
        channel = channel + _taylor(adapter.mlp_output(layer)).sum(0)
        mlp.append(channel / shape.params_per_channel)
        q, k, v = adapter.attn_qkv(layer)
        head = _taylor(q).view(shape.heads, -1).sum(1)                                 # (H,)
        head = head + _taylor(adapter.attn_output(layer)).view(-1, shape.heads, hd).sum((0, 2))
        size = shape.q_params_per_head
        if shape.group_size == 1:
            head = head + (_taylor(k) + _taylor(v)).view(shape.heads, -1).sum(1)
            size += shape.kv_params_per_group
        heads.append(head / size)
    return torch.stack(mlp).cpu(), torch.stack(heads).cpu()


def _taylor(linear: torch.nn.Linear) -> torch.Tensor:
    grad = getattr(linear.weight, "grad32", None)
    grad = linear.weight.grad if grad is None else grad
    if grad is None:
        return torch.zeros_like(linear.weight, dtype=torch.float32)
    return (linear.weight.detach().float() * grad.float()).abs()


def masked_scores(model, adapter: FamilyAdapter, shape: ModelShape, alive_mlp: torch.Tensor,
                  alive_heads: torch.Tensor, sources: list[list],
                  aggregate: Literal["pooled", "per_source"] = "pooled",
                  objective: Literal["perplexity", "margin"] = "perplexity"
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Scores of every structure of the masked model and its mean objective. ``sources``:
    per source a list of batches (perplexity) or of ``MarginItem`` (margin)."""
    layers = adapter.decoder_layers(model)
    backward = _backward if objective == "perplexity" else _margin_backward
    if aggregate == "pooled":
        with _gradients(model, adapter, layers, shape, alive_mlp, alive_heads):
            loss = backward(model, [b for source in sources for b in source])
            mlp, heads = structure_scores(adapter, layers, shape)
        return mlp, heads, loss
    parts, losses = [], []
    for batches in sources:
        with _gradients(model, adapter, layers, shape, alive_mlp, alive_heads):
            losses.append(backward(model, batches))
            parts.append(structure_scores(adapter, layers, shape))
    mlp = torch.stack([_unit_mean(m, alive_mlp) for m, _ in parts]).mean(0)
    heads = torch.stack([_unit_mean(h, alive_heads) for _, h in parts]).mean(0)
    return mlp, heads, sum(losses) / len(losses)


def _unit_mean(scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Each layer's scores (L, N) divided by the mean over its alive structures."""
    mean = (scores * alive).sum(1, keepdim=True) / alive.sum(1, keepdim=True).clamp_min(1)
    return scores / mean.clamp_min(1e-30)


def _backward(model, batches: Iterable[Batch]) -> float:
    """Accumulate the gradient of the mean next-token loss over ``batches``; the loss."""
    device = next(model.parameters()).device
    batches = list(batches)
    tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
    total = 0.0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        loss = next_token_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        (loss / tokens).backward()
        total += float(loss.detach())
    return total / max(tokens, 1)


@dataclass(frozen=True)
class MarginItem:
    """One multiple-choice question: every choice appended to the query, one row each."""

    ids: torch.Tensor        # (C, T) query + " " + choice, right-padded
    mask: torch.Tensor       # (C, T) attention mask
    answer: torch.Tensor     # (C, T) 1 on the choice's own tokens (the scored targets)
    gold: int


def margin_items(tokenizer, rows: list[dict], pad_id: int) -> list[MarginItem]:
    """Tokenized questions ``{"query", "choices", "gold"}`` (the cloze of the MC tasks)."""
    items = []
    for row in rows:
        query = tokenizer(row["query"], add_special_tokens=False)["input_ids"]
        seqs = [query + tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                for c in row["choices"]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask, answer = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
            answer[i, len(query):len(seq)] = 1
        items.append(MarginItem(ids, mask, answer, int(row["gold"])))
    return items


def _margin_backward(model, items: list[MarginItem]) -> float:
    """Accumulate the gradient of the mean margin over questions; the mean margin."""
    device = next(model.parameters()).device
    total = 0.0
    for item in items:
        ids, mask, answer = item.ids.to(device), item.mask.to(device), item.answer.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits                # (C, T, V)
        losses = torch.stack([next_token_loss(logits[c:c + 1], ids[c:c + 1], answer[c:c + 1])
                              for c in range(len(ids))])                         # (C,)
        margin = margin_loss(losses[None], torch.tensor([item.gold], device=device))
        (margin / len(items)).backward()
        total += float(margin.detach())
    return total / max(len(items), 1)


@contextlib.contextmanager
def _gradients(model, adapter: FamilyAdapter, layers: list, shape: ModelShape,
               alive_mlp: torch.Tensor, alive_heads: torch.Tensor):
    """Masks on, gradients on the prunable weights only; everything restored on exit."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    weights = [w.weight for layer in layers for w in
               (*adapter.mlp_inputs(layer), adapter.mlp_output(layer),
                *adapter.attn_qkv(layer), adapter.attn_output(layer))]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    keep = [([m.to(device, dtype) for m in alive_mlp], [h.to(device, dtype) for h in alive_heads])]
    handles = [] if dtype == torch.float32 else [_float32_sum(w) for w in weights]
    try:
        with soft_masks(model, adapter, None, keep, shape.head_dim):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for w in weights:
            w.grad = None
            if hasattr(w, "grad32"):
                del w.grad32
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _float32_sum(weight: torch.nn.Parameter):
    """Move each batch's gradient (model dtype, e.g. bf16 on a GPU) into a float32 sum."""
    weight.grad32 = None

    def hook(param):
        grad = param.grad.float()
        param.grad32 = grad if param.grad32 is None else param.grad32 + grad
        param.grad = None

    return weight.register_post_accumulate_grad_hook(hook)
