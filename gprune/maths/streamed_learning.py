"""The learned allocators' objective, layer streamed (``gprune.maths.learned`` in memory).

``learned.optimize_keep`` learns keep fractions by Adam on KL(dense || soft-masked) over
calibration batches. On a ``StreamedModel`` (one decoder layer's weights on the device at
a time; ``gprune.maths.streaming``) each step runs, for its batch:

1. forward, layer by layer without a graph, under the current soft masks, keeping each
   layer's input hidden states (B, T, H) on the host;
2. the head on the last hidden states (with a graph), the KL to the dense teacher plus the
   budget term, backpropagated: the gradient reaches the masks' parameters through the
   budget term and stops at the last hidden states;
3. backward, layer by layer from the last: the layer is loaded again, rerun on its kept
   input with a graph, and backpropagated from the gradient of its output; the gradient of
   its input goes to the layer below, and the masks' parameters collect their share.

This is activation checkpointing at layer granularity: the same loss and, up to the order
of floating-point sums, the same gradients as the in-memory run, at the cost of reading
every layer twice and running it twice per step. The dense teachers come from one streamed
pass before the masks are on. Device memory: the non-layer weights, one layer, one batch's
activations; host memory: one batch's hidden states per layer and the teachers' log-
probabilities (as in memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gprune.maths.learned import MaskLayout, kl_to_dense, soft_masks
from gprune.maths.streaming import (Call, HiddenStore, StreamBatch, _run, head_logits_of,
                                    mapped, record_batch, run_layers)
from gprune.models.adapters import FamilyAdapter

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class StreamedKl:
    """``learned.InMemoryKl`` on a layer-streamed ``source``."""

    def __init__(self, source, batches: Batches):
        self.source, self.device = source, source.device
        source.model.requires_grad_(False)
        self.keep: list = [None]
        self.batches, self.embeddings, self.teachers = [], [], []
        with HiddenStore() as store:
            for number, (input_ids, mask) in enumerate(batches):
                ids, mask = input_ids.to(self.device), mask.to(self.device)        # (B, T)
                calls = record_batch(source, ids, mask, store, number)
                self.embeddings.append(store.get(number).clone())                # (B, T, H)
                self.batches.append(StreamBatch([_grad_ready(c) for c in calls], None,
                                                ids, mask))
            run_layers(source, self.batches, store)                               # dense
            for number, batch in enumerate(self.batches):
                with torch.inference_mode():
                    logits = head_logits_of(source, store.get(number), batch)     # (B, T, V)
                    teacher = F.log_softmax(logits[:, :-1].float(), dim=-1)
                self.teachers.append(teacher.clone())                             # (B, T-1, V)

    def masked(self, adapter: FamilyAdapter, layout: MaskLayout, head_dim: int):
        return soft_masks(self.source.model, adapter, layout, self.keep, head_dim)

    def backward(self, index: int, masks, extra: torch.Tensor) -> float:
        """Backpropagate KL on batch ``index`` under ``masks`` plus ``extra``; the loss."""
        batch, self.keep[0] = self.batches[index], masks
        inputs, final = self._forward(batch, self.embeddings[index])
        final.requires_grad_(True)                                                # (B, T, H)
        logits = head_logits_of(self.source, final, batch)                       # (B, T, V)
        mask = batch.attention_mask[:, 1:]
        loss = kl_to_dense(logits[:, :-1], self.teachers[index], mask).cpu() + extra
        loss.backward(retain_graph=True)          # the masks' graph serves every layer
        grad = final.grad                                                         # (B, T, H)
        for number in reversed(range(len(self.source.layers))):
            grad = self._layer_backward(number, batch, inputs[number], grad)
        return float(loss.detach())

    def _forward(self, batch: StreamBatch, embeddings: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every layer's input (host) and the last layer's output (device)."""
        hidden, inputs = embeddings, []
        with torch.no_grad():
            for number in range(len(self.source.layers)):
                layer = self.source.load_layer(number)
                try:
                    inputs.append(hidden.to("cpu"))
                    hidden = _run(layer, hidden.to(self.device), batch.calls[number],
                                  self.device)
                finally:
                    self.source.unload_layer(number)
        return inputs, hidden

    def _layer_backward(self, number: int, batch: StreamBatch, layer_input: torch.Tensor,
                        grad: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``grad`` (of layer ``number``'s output) through the layer; the
        gradient of its input."""
        layer = self.source.load_layer(number)
        try:
            hidden = layer_input.to(self.device).requires_grad_(True)             # (B, T, H)
            out = _run(layer, hidden, batch.calls[number], self.device)
            torch.autograd.backward(out, grad, retain_graph=True)
            return hidden.grad
        finally:
            self.source.unload_layer(number)


def _grad_ready(call: Call) -> Call:
    """``call`` with its tensors cloned out of inference mode (a graph may save them)."""
    memo: dict = {}
    return Call(mapped(call.args, torch.clone, memo), mapped(call.kwargs, torch.clone, memo),
                call.positional)

