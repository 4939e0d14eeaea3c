"""Loss sensitivity of each residual-stream dimension at every output projection.

A pruned output projection leaves an error ``e`` (hidden,) in what it adds to the residual
stream; to second order the language-modelling loss grows by ``e^T F e / 2`` with F the
Fisher of the loss with respect to that output. With F's diagonal,

    F_i = E_t[(dL/dy_{t,i})^2]        y_t: the projection's output at token t,

the refit's per-dimension residual (``gprune.maths.refit.Refit.per_output``) prices a
pruning choice in units of loss, so layers and kinds (MLP channels, attention heads)
compare (the diagonal Fisher of Optimal Brain Damage, LeCun et al. 1990, taken on
activations as in SlimGPT/ZipLM-style layer allocation). ``L`` is the summed next-token
loss of the real (non-padding) tokens; F is averaged over the predicted tokens.

Hooks are registered inside ``output_fisher`` and always removed. Only activations need
gradients: the parameters' ``requires_grad`` is switched off for the pass and restored, so
no parameter gradient is computed or kept. Shapes in the comments.
"""
from __future__ import annotations

import torch
from torch import nn

from gprune.maths.learned import next_token_loss
from gprune.models.adapters import FamilyAdapter

KINDS = ("mlp", "attn")


def output_fisher(model: nn.Module, adapter: FamilyAdapter,
                  batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer {"mlp": (hidden,), "attn": (hidden,)} float64: the mean over
    predicted tokens of the squared gradient of the summed loss w.r.t. the output of the
    MLP and the attention output projection. ``batches``: (input_ids, attention_mask) (B, T)."""
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    hidden = adapter.mlp_output(layers[0]).out_features
    sums = [{kind: torch.zeros(hidden, dtype=torch.float64, device=device) for kind in KINDS}
            for _ in layers]
    rows: dict[str, torch.Tensor] = {}                     # the batch's real-token mask

    def on_output(acc: torch.Tensor, module: nn.Module, args: tuple, output: torch.Tensor):
        def grad_hook(grad: torch.Tensor) -> None:                          # (B, T, hidden)
            acc.add_((grad.double() ** 2 * rows["mask"][..., None]).sum((0, 1)))
        if output.requires_grad:
            output.register_hook(grad_hook)

    handles = [model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.requires_grad_(True))]
    for layer, acc in zip(layers, sums):
        handles += [adapter.mlp_output(layer).register_forward_hook(
                        lambda m, a, o, acc=acc["mlp"]: on_output(acc, m, a, o)),
                    adapter.attn_output(layer).register_forward_hook(
                        lambda m, a, o, acc=acc["attn"]: on_output(acc, m, a, o))]
    predicted = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for param in trainable:
            param.requires_grad_(False)
        with torch.enable_grad():
            for input_ids, attention_mask in batches:
                predicted += _backward_batch(model, input_ids.to(device),
                                             attention_mask.to(device), rows)
    finally:
        for handle in handles:
            handle.remove()
        for param in trainable:
            param.requires_grad_(True)
    if predicted == 0:
        raise ValueError("no predicted tokens in the calibration batches")
    return [{kind: acc[kind] / predicted for kind in KINDS} for acc in sums]


def _backward_batch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    rows: dict) -> int:
    """Summed next-token loss of one batch, backpropagated to the hooked activations;
    returns the number of predicted tokens."""
    rows["mask"] = attention_mask.to(torch.float64)                           # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    next_token_loss(logits, input_ids, attention_mask).backward()
    return int(attention_mask[:, 1:].sum())
