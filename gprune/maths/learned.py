"""Stage 5 (learned): module-wise keep fractions under the global budget.

k(M) = sigmoid(theta_M) per module. Unit u at local position q(u) = 1 - score(u)
(the module's best unit sits at 0) gets the soft mask sigmoid((k(M) - q(u)) / T),
T annealed geometrically. Objective: KL(dense || masked) of next-token
distributions on mixed-source calibration tokens + lambda * (budget(k) - (1-S))^2,
minimised with Adam over theta only (model weights frozen). See METHOD.md stage 5.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F

from gprune.maths.allocate import Fractions, module_sizes
from gprune.maths.budget import prunable_params
from gprune.models.adapters import FamilyAdapter, ModelShape


@dataclass
class LearnSettings:
    steps: int = 30
    lr: float = 0.1
    penalty: float = 50.0
    t_start: float = 0.05
    t_end: float = 0.01
    prune_attention: bool = True


@dataclass
class MaskLayout:
    """Index tensors mapping units to trainable modules (one entry per layer)."""

    mlp_module: list[torch.Tensor]   # (intermediate,) index into theta
    mlp_q: list[torch.Tensor]        # (intermediate,) local position in [0, 1]
    attn_module: list[int]           # theta index of the layer's head module, -1 if frozen
    attn_q: list[torch.Tensor]       # (heads,)
    sizes: list[int] = field(default_factory=list)        # units per theta entry
    unit_params: list[float] = field(default_factory=list)  # params per unit of each theta entry
    names: list[tuple] = field(default_factory=list)      # ("mlp", layer, module) | ("attn", layer)


def build_layout(scores: pd.DataFrame, shape: ModelShape, prune_attention: bool) -> MaskLayout:
    layout = MaskLayout([], [], [], [])
    for layer in range(shape.num_layers):
        mlp = scores[(scores.layer == layer) & (scores.kind == "mlp")].sort_values("unit")
        index = torch.empty(shape.intermediate, dtype=torch.long)
        for module, group in mlp.groupby("module"):
            index[torch.as_tensor(group.unit.to_numpy().copy())] = len(layout.names)
            layout.names.append(("mlp", layer, int(module)))
            layout.sizes.append(len(group))
            layout.unit_params.append(shape.params_per_channel)
        layout.mlp_module.append(index)
        layout.mlp_q.append(torch.as_tensor(1.0 - mlp.score.to_numpy(), dtype=torch.float32))
        attn = scores[(scores.layer == layer) & (scores.kind == "attn")].sort_values("unit")
        layout.attn_q.append(torch.as_tensor(1.0 - attn.score.to_numpy(), dtype=torch.float32))
        if prune_attention:
            layout.attn_module.append(len(layout.names))
            layout.names.append(("attn", layer))
            layout.sizes.append(shape.heads)
            layout.unit_params.append(shape.head_params_amortized)
        else:
            layout.attn_module.append(-1)
    return layout


@contextlib.contextmanager
def soft_masks(model: torch.nn.Module, adapter: FamilyAdapter, layout: MaskLayout,
               keep: list[torch.Tensor], head_dim: int):
    """Scale the inputs of each MLP / attention output projection by the current soft masks.

    ``keep`` is a one-element list holding (mlp_masks, head_masks) lists, refreshed each step.
    Hooks are always removed.
    """
    handles = []
    for layer_idx, layer in enumerate(adapter.decoder_layers(model)):
        def mlp_hook(_mod, args, i=layer_idx):
            return (args[0] * keep[0][0][i],) + args[1:]            # (B, T, I) * (I,)

        def attn_hook(_mod, args, i=layer_idx):
            heads = keep[0][1][i]
            if heads is None:
                return None
            return (args[0] * heads.repeat_interleave(head_dim),) + args[1:]  # (B, T, H*hd)

        handles.append(adapter.mlp_output(layer).register_forward_pre_hook(mlp_hook))
        handles.append(adapter.attn_output(layer).register_forward_pre_hook(attn_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def masks_for(keep_fractions: torch.Tensor, layout: MaskLayout, temperature: float):
    """Soft masks of every layer from the modules' keep fractions (M,)."""
    k = keep_fractions
    mlp = [torch.sigmoid((k[idx] - q) / temperature) for idx, q in zip(layout.mlp_module, layout.mlp_q)]
    heads = [None if m < 0 else torch.sigmoid((k[m] - q) / temperature)
             for m, q in zip(layout.attn_module, layout.attn_q)]
    return mlp, heads


def expected_keep(keep_fractions: torch.Tensor, layout: MaskLayout, shape: ModelShape) -> torch.Tensor:
    """Expected kept fraction of the prunable parameters under keep fractions (M,)."""
    weights = torch.tensor([n * p for n, p in zip(layout.sizes, layout.unit_params)],
                           dtype=keep_fractions.dtype)
    frozen = sum(shape.heads * shape.head_params_amortized for m in layout.attn_module if m < 0)
    return (keep_fractions @ weights + frozen) / prunable_params(shape)


def kl_to_dense(student_logits, teacher_logprobs, mask) -> torch.Tensor:
    """Mean KL(dense || masked) over real (mask == 1) positions. logits (B, T, V)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)     # (B, T)
    return (kl * mask).sum() / mask.sum()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over real (mask == 1) target positions; logits
    (B, T, V), computed in at least float32."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)                 # (B, T-1)
    wide = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.flatten(0, 1), targets.flatten(),
                           ignore_index=-100, reduction="sum")


def learn_fractions(model, adapter: FamilyAdapter, shape: ModelShape, scores: pd.DataFrame,
                    batches: list[tuple[torch.Tensor, torch.Tensor]], sparsity: float,
                    settings: LearnSettings) -> tuple[Fractions, list[float]]:
    """Learn keep fractions for one target; return them and the objective per step."""
    layout = build_layout(scores, shape, settings.prune_attention)
    start = min(max(1.0 - sparsity, 1e-3), 1 - 1e-3)
    theta = torch.full((len(layout.names),), math.log(start / (1 - start)), requires_grad=True)
    history = optimize_keep(model, adapter, shape, layout, batches, [theta], settings,
                            lambda step: (torch.sigmoid(theta), sparsity))
    return fractions_from_keep(torch.sigmoid(theta.detach()), layout, scores, shape), history


def optimize_keep(model, adapter: FamilyAdapter, shape: ModelShape, layout: MaskLayout,
                  batches: list[tuple[torch.Tensor, torch.Tensor]], params: list[torch.Tensor],
                  settings: LearnSettings, keep_at) -> list[float]:
    """Adam on ``params`` (model frozen). ``keep_at(step) -> (keep fractions (M,), sparsity)``;
    objective: KL(dense || soft-masked) + penalty * (expected keep - (1 - sparsity))^2.
    ``model``: a CausalLM, or a layer-streamed source (``load_layer``; see
    ``gprune.maths.streamed_learning``), which runs the same objective a layer at a time."""
    if hasattr(model, "load_layer"):
        from gprune.maths.streamed_learning import StreamedKl

        objective = StreamedKl(model, batches)
    else:
        objective = InMemoryKl(model, batches)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    history = []
    device_layout = _to_device(layout, objective.device)
    with objective.masked(adapter, device_layout, shape.head_dim):
        for step in range(settings.steps):
            t = settings.t_start * (settings.t_end / settings.t_start) ** (step / max(settings.steps - 1, 1))
            k, sparsity = keep_at(step)
            masks = masks_for(k.to(objective.device), device_layout, t)
            budget = (expected_keep(k, layout, shape) - (1.0 - sparsity)) ** 2
            optimizer.zero_grad()
            history.append(objective.backward(step % len(batches), masks,
                                              settings.penalty * budget))
            optimizer.step()
    return history


class InMemoryKl:
    """The learning objective on a model in memory: its teachers are the dense model's
    log-probabilities on each batch, computed before any mask is applied."""

    def __init__(self, model, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.batches = model, batches
        self.device = next(model.parameters()).device
        self.teachers = _teacher_logprobs(model, batches)
        self.keep: list = [None]
        model.requires_grad_(False)

    def masked(self, adapter: FamilyAdapter, layout: MaskLayout, head_dim: int):
        return soft_masks(self.model, adapter, layout, self.keep, head_dim)

    def backward(self, index: int, masks, extra: torch.Tensor) -> float:
        """Backpropagate KL on batch ``index`` under ``masks`` plus ``extra``; the loss."""
        input_ids, mask = self.batches[index]
        self.keep[0] = masks
        logits = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=mask.to(self.device)).logits
        kl = kl_to_dense(logits[:, :-1], self.teachers[index], mask[:, 1:].to(self.device))
        loss = kl.cpu() + extra
        loss.backward()
        return float(loss.detach())


@torch.no_grad()
def _teacher_logprobs(model, batches) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [F.log_softmax(model(input_ids=ids.to(device), attention_mask=m.to(device)).logits[:, :-1]
                          .float(), dim=-1) for ids, m in batches]


def _to_device(layout: MaskLayout, device) -> MaskLayout:
    if str(device) == "cpu":
        return layout
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return MaskLayout(move(layout.mlp_module), move(layout.mlp_q), layout.attn_module,
                      move(layout.attn_q), layout.sizes, layout.unit_params, layout.names)


def fractions_from_keep(keep_fractions: torch.Tensor, layout: MaskLayout, scores: pd.DataFrame,
                        shape: ModelShape) -> Fractions:
    k = keep_fractions.tolist()
    mlp = {(n[1], n[2]): k[i] for i, n in enumerate(layout.names) if n[0] == "mlp"}
    attn = {layer: 1.0 for layer in range(shape.num_layers)}
    attn.update({n[1]: k[i] for i, n in enumerate(layout.names) if n[0] == "attn"})
    return Fractions(mlp, module_sizes(scores), attn)
