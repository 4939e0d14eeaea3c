"""Channel surgery: physically slice a model's projections to a pruning plan.

Everything happens in place, layer by layer, on whatever device the model lives on:
each projection's weight is replaced by a sliced copy (one projection extra at a time,
never a second copy of the model). Module lookup goes through the ``FamilyAdapter``.

- MLP: rows of the input projections (gate/up or fc1) and columns of the output projection.
- Attention: q rows / o columns per kept query head, k/v rows per kept KV group; biases
  of q/k/v are sliced with their rows.
- Optional FLAP bias compensation: the removed channels' mean contribution
  ``W_out[:, removed] @ mean[removed]`` is added to the output projection's bias
  (a zero bias is created when the dense projection has none).

A layer that keeps no query head is left with zero-sized q/k/v/o weights here; the
pruned-checkpoint code (gprune/models/pruned.py) swaps in an empty attention module.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from gprune.errors import ConfigError
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.models.adapters import FamilyAdapter, ModelShape

Means = Mapping[tuple[int, str], torch.Tensor]   # (layer, "mlp"|"attn") -> (channels,)


def head_channels(heads: tuple[int, ...] | list[int], head_dim: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """Channel indices of whole heads: (len(heads) * head_dim,) int64."""
    idx = torch.as_tensor(list(heads), dtype=torch.long, device=device)   # (h,)
    offsets = torch.arange(head_dim, device=device)                        # (d,)
    return (idx[:, None] * head_dim + offsets[None, :]).reshape(-1)        # (h*d,)


def removed_channels(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Complement of ``keep`` in ``range(size)``: (size - len(keep),) int64."""
    mask = torch.ones(size, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().reshape(-1)


@torch.no_grad()
def slice_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output features ``rows``: weight (out, in) -> (len(rows), in); bias too."""
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight[rows].contiguous(), requires_grad=grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows].contiguous(), requires_grad=grad)
    linear.out_features = int(rows.numel())


@torch.no_grad()
def slice_cols(linear: nn.Linear, cols: torch.Tensor) -> None:
    """Keep input features ``cols``: weight (out, in) -> (out, len(cols)); bias unchanged."""
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight[:, cols].contiguous(), requires_grad=grad)
    linear.in_features = int(cols.numel())


@torch.no_grad()
def compensation(weight_out: torch.Tensor, mean: torch.Tensor,
                 removed: torch.Tensor) -> torch.Tensor:
    """FLAP bias delta ``W_out[:, removed] @ mean[removed]`` in float64: (out,)."""
    w = weight_out[:, removed].double()                       # (out, r)
    m = mean.to(device=w.device, dtype=torch.float64)[removed.to(w.device)]  # (r,)
    return w @ m                                              # (out,)


@torch.no_grad()
def add_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """Add ``delta`` (out,) to the bias, creating a zero bias when there is none."""
    weight = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                               device=weight.device),
                                   requires_grad=weight.requires_grad)
    linear.bias += delta.to(dtype=linear.bias.dtype, device=linear.bias.device)


def prune_mlp(layer: nn.Module, adapter: FamilyAdapter, keep: tuple[int, ...],
              size: int, mean: torch.Tensor | None = None) -> None:
    """Slice one layer's MLP to the channels ``keep`` (optionally compensating the rest)."""
    out = adapter.mlp_output(layer)
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=out.weight.device)
    if mean is not None:
        add_bias(out, compensation(out.weight, mean, removed_channels(idx, size)))
    for linear in adapter.mlp_inputs(layer):
        slice_rows(linear, idx)
    slice_cols(out, idx)


def prune_attention(layer: nn.Module, adapter: FamilyAdapter, plan: LayerPlan,
                    shape: ModelShape, mean: torch.Tensor | None = None) -> None:
    """Slice q/o by kept query head and k/v by kept KV group (optionally compensating)."""
    q, k, v = adapter.attn_qkv(layer)
    o = adapter.attn_output(layer)
    device = o.weight.device
    q_idx = head_channels(plan.heads_keep, shape.head_dim, device)    # (h_keep*d,)
    kv_idx = head_channels(plan.kv_keep, shape.head_dim, device)      # (g_keep*d,)
    if mean is not None:
        removed = removed_channels(q_idx, shape.heads * shape.head_dim)
        add_bias(o, compensation(o.weight, mean, removed))
    slice_rows(q, q_idx)
    slice_rows(k, kv_idx)
    slice_rows(v, kv_idx)
    slice_cols(o, q_idx)


def layer_sizes(layer: nn.Module, adapter: FamilyAdapter, plan: LayerPlan) -> dict:
    """The per-layer entry of ``config.gprune_layers`` after surgery."""
    return {"intermediate_size": len(plan.mlp_keep), "num_heads": len(plan.heads_keep),
            "num_kv_heads": len(plan.kv_keep),
            "mlp_out_bias": adapter.mlp_output(layer).bias is not None,
            "attn_out_bias": adapter.attn_output(layer).bias is not None}


def apply_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan,
               means: Means | None = None) -> list[dict]:
    """Slice every layer of ``model`` in place; return the per-layer sizes.

    ``means`` (pooled per-channel input means of the output projections) turns on bias
    compensation; without it the removed channels are simply dropped.
    """
    shape = plan.dense
    if getattr(model.config, "gprune_layers", None) is not None:
        raise ConfigError("this model is already pruned; apply plans to the dense model")
    if adapter.shape(model.config) != shape:
        raise ConfigError(f"plan is for a model of shape {shape}, not "
                          f"{adapter.shape(model.config)}; make a plan for this model")
    sizes = []
    for lp, layer in zip(plan.layers, adapter.decoder_layers(model), strict=True):
        mlp_mean = means[(lp.layer, "mlp")] if means is not None else None
        attn_mean = means[(lp.layer, "attn")] if means is not None else None
        prune_mlp(layer, adapter, lp.mlp_keep, shape.intermediate, mlp_mean)
        prune_attention(layer, adapter, lp, shape, attn_mean)
        sizes.append(layer_sizes(layer, adapter, lp))
    return sizes


def channel_means(channels, shape: ModelShape) -> dict[tuple[int, str], torch.Tensor]:
    """Pooled per-channel means from a stats ``channels.parquet`` frame.

    ``channels`` has columns layer, kind ("mlp"|"attn"), channel, mean. Returns
    ``{(layer, kind): (size,) float64}`` with size = intermediate or heads*head_dim.
    Raises ValueError when a layer/kind is missing or incomplete.
    """
    sizes = {"mlp": shape.intermediate, "attn": shape.heads * shape.head_dim}
    means = {}
    for (layer, kind), group in channels.groupby(["layer", "kind"]):
        if kind not in sizes:
            continue
        values = torch.full((sizes[kind],), float("nan"), dtype=torch.float64)
        values[torch.tensor(group["channel"].to_numpy(), dtype=torch.long)] = \
            torch.tensor(group["mean"].to_numpy(), dtype=torch.float64)
        means[(int(layer), str(kind))] = values
    for layer in range(shape.num_layers):
        for kind in sizes:
            got = means.get((layer, kind))
            if got is None or torch.isnan(got).any():
                raise ValueError(f"no complete {kind} channel means for layer {layer}")
    return means
