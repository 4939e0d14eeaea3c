"""Channel surgery: physically slice a model's projections to a pruning plan.

Everything happens in place, layer by layer, on whatever device the model lives on:
each projection's weight is replaced by a sliced copy (one projection extra at a time,
never a second copy of the model). Module lookup goes through the ``FamilyAdapter``.

- MLP: rows of the input projections (gate/up or fc1) and columns of the output projection.
- Attention: q rows / o columns per kept query head, k/v rows per kept KV group; biases
  of q/k/v are sliced with their rows.
- Optional reconstruction of each output projection (``fits``; ``gprune.maths.refit``):
  FLAP bias compensation (``bias_fits``: the removed channels' mean contribution moves
  into the bias) or a least-squares refit of the kept columns and the bias; either
  creates a bias where the dense projection has none.

A layer that keeps no query head is left with zero-sized q/k/v/o weights here; the
pruned-checkpoint code (gprune/models/pruned.py) swaps in an empty attention module.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from gprune.errors import ConfigError
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.refit import bias_refit, dense_map, dense_products, lsq_refit
from gprune.models.adapters import FamilyAdapter, ModelShape

Means = Mapping[tuple[int, str], torch.Tensor]   # (layer, "mlp"|"attn") -> (channels,)
# (weight (out, d), bias (out,) | None, kept columns (k,)) -> (weight (out, k), bias (out,))
Fit = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor],
               tuple[torch.Tensor, torch.Tensor]]
Fits = Callable[[int, str], Optional[Fit]]       # (layer, "mlp"|"attn") -> its Fit
# memo(layer, kind, key, compute): compute(), or the value remembered under ``key`` for the
# Gram that ``gram_of(layer, kind)`` reads (the caller knows which files that is)
Memo = Callable[[int, str, tuple, Callable[[], Any]], Any]


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
def set_output(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Replace an output projection's weight (out, k) and bias (out,), in its dtype."""
    like = linear.weight
    linear.weight = nn.Parameter(weight.to(device=like.device, dtype=like.dtype).contiguous(),
                                 requires_grad=like.requires_grad)
    linear.bias = nn.Parameter(bias.to(device=like.device, dtype=like.dtype).contiguous(),
                               requires_grad=like.requires_grad)
    linear.in_features = int(weight.shape[1])


def prune_output(out: nn.Linear, keep: torch.Tensor, fit: Fit | None) -> None:
    """Keep the input columns ``keep`` of an output projection, refit by ``fit`` if given.
    A projection that loses no column keeps its dense weights: they are the exact fit
    (a damped refit would only move them away from it)."""
    if keep.numel() == out.in_features:
        return
    if fit is None:
        slice_cols(out, keep)
        return
    weight, bias = fit(out.weight, out.bias, keep)                        # (out, k), (out,)
    set_output(out, weight, bias)


def prune_mlp(layer: nn.Module, adapter: FamilyAdapter, keep: tuple[int, ...],
              fit: Fit | None = None) -> None:
    """Slice one layer's MLP to the channels ``keep`` (the output projection refit by ``fit``)."""
    out = adapter.mlp_output(layer)
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=out.weight.device)
    for linear in adapter.mlp_inputs(layer):
        slice_rows(linear, idx)
    prune_output(out, idx, fit)


def prune_attention(layer: nn.Module, adapter: FamilyAdapter, plan: LayerPlan,
                    shape: ModelShape, fit: Fit | None = None) -> None:
    """Slice q/o by kept query head and k/v by kept KV group (o refit by ``fit``)."""
    q, k, v = adapter.attn_qkv(layer)
    o = adapter.attn_output(layer)
    device = o.weight.device
    q_idx = head_channels(plan.heads_keep, shape.head_dim, device)    # (h_keep*d,)
    kv_idx = head_channels(plan.kv_keep, shape.head_dim, device)      # (g_keep*d,)
    slice_rows(q, q_idx)
    slice_rows(k, kv_idx)
    slice_rows(v, kv_idx)
    prune_output(o, q_idx, fit)


def layer_sizes(layer: nn.Module, adapter: FamilyAdapter, plan: LayerPlan) -> dict:
    """The per-layer entry of ``config.gprune_layers`` after surgery."""
    return {"intermediate_size": len(plan.mlp_keep), "num_heads": len(plan.heads_keep),
            "num_kv_heads": len(plan.kv_keep),
            "mlp_out_bias": adapter.mlp_output(layer).bias is not None,
            "attn_out_bias": adapter.attn_output(layer).bias is not None}


def apply_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan,
               fits: Fits | None = None) -> list[dict]:
    """Slice every layer of ``model`` in place; return the per-layer sizes.

    ``fits(layer, kind)`` (kind "mlp" | "attn") gives the reconstruction of that output
    projection (``bias_fits``, ``gprune.maths.refit``); None: the removed channels are
    simply dropped.
    """
    check_dense(model, adapter, plan)
    return [prune_layer(layer, adapter, lp, plan.dense, fits)
            for lp, layer in zip(plan.layers, adapter.decoder_layers(model), strict=True)]


def check_dense(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan) -> None:
    """Refuse a model that is already pruned or of another shape than the plan's."""
    if getattr(model.config, "gprune_layers", None) is not None:
        raise ConfigError("this model is already pruned; apply plans to the dense model")
    if adapter.shape(model.config) != plan.dense:
        raise ConfigError(f"plan is for a model of shape {plan.dense}, not "
                          f"{adapter.shape(model.config)}; make a plan for this model")


def prune_layer(layer: nn.Module, adapter: FamilyAdapter, lp: LayerPlan, shape: ModelShape,
                fits: Fits | None = None) -> dict:
    """Slice one decoder layer to its plan (refit by ``fits``); return its sizes."""
    prune_mlp(layer, adapter, lp.mlp_keep, fits(lp.layer, "mlp") if fits else None)
    prune_attention(layer, adapter, lp, shape, fits(lp.layer, "attn") if fits else None)
    return layer_sizes(layer, adapter, lp)


def bias_fits(means: Means) -> Fits:
    """FLAP bias compensation from pooled per-channel input means."""
    return lambda layer, kind: lambda w, b, keep: bias_refit(w, b, means[(layer, kind)], keep)


def lsq_fits(gram_of: Callable[[int, str], torch.Tensor], ridge: float,
             report: list[dict], residual: bool = True, memo: Memo | None = None) -> Fits:
    """Least-squares refits from ``gram_of(layer, kind)`` (normalized (d+1, d+1) Grams);
    appends each projection's residual (NaN unless ``residual``) and condition number to
    ``report``. ``memo``: remembers each refit (by the dense weights, the kept columns and
    the ridge) and each projection's plan-independent ``dense_products``, so a plan refit
    twice in one process (the KL check, then surgery) is solved once and every plan's
    refit of a projection starts from the same products."""
    def fits(layer: int, kind: str) -> Fit:
        def fit(weight, bias, keep):
            if memo is None:
                result = _solved(layer, kind, weight, bias, keep, None)
            else:
                dense = dense_digest(weight, bias)
                result = memo(layer, kind, ("refit", dense, tensor_digest(keep), ridge, residual),
                              lambda: _solved(layer, kind, weight, bias, keep, dense))
            report.append({"layer": layer, "kind": kind, "kept": int(keep.numel()),
                           "residual": result.residual, "condition": result.condition})
            if memo is not None:           # the memo's tensors stay its own
                return result.weight.clone(), result.bias.clone()
            return result.weight, result.bias
        return fit

    def _solved(layer, kind, weight, bias, keep, dense: str | None):
        """The refit; ``dense``: the weights' digest, when the memo holds their products."""
        gram = gram_of(layer, kind)
        def computed():
            return dense_products(dense_map(weight, bias), gram.to(weight.device, torch.float64))
        products = computed() if dense is None else memo(layer, kind, ("products", dense), computed)
        try:
            return lsq_refit(weight, bias, gram, keep, ridge, residual=residual,
                             products=products)
        except ValueError as err:
            raise ConfigError(f"layer {layer} {kind}: {err}") from err
    return fits


def dense_digest(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """A digest of a projection's weights and bias (None: no bias) as they are stored."""
    return tensor_digest(weight) + ("" if bias is None else tensor_digest(bias))


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and values."""
    flat = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{flat.dtype}{tuple(flat.shape)}".encode())
    digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
