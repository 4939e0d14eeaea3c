"""The allocate stage's KL check, layer streamed (``gprune.maths.plan_check`` in memory).

The dense model and a pruned (refit) copy per plan advance together through the decoder,
one dense layer read at a time (``gprune.maths.streaming``): after a layer's weights are
read, each plan's copy of that layer is sliced and refit (``prune_layer``) and made into
what the pruned class runs (``finalize_layer``), then every batch's hidden states of the
dense model and of each plan go through their layer. The last hidden states give the
logits through the model's own norm and head, and KL(dense || plan) is averaged over the
predicted tokens exactly as ``plan_check.calibration_kls`` does. Device memory: the
non-layer weights, one dense layer and its pruned copies, one batch; host memory: the
hidden states of every batch, once per plan plus once for the dense model.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
from torch import nn

from gprune.maths.plan import PruningPlan
from gprune.maths.plan_check import SequenceKls, dense_terms
from gprune.maths.streaming import HiddenStore, StreamBatch, _run, head_logits, record_batch
from gprune.maths.surgery import Fits, prune_layer
from gprune.models.pruned import finalize_layer

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def pruned_layer(layer: nn.Module, index: int, plan: PruningPlan, fits: Fits | None,
                 adapter, hidden: int) -> tuple[nn.Module, dict]:
    """A sliced, refit copy of the loaded dense ``layer`` as ``plan`` keeps it, and its
    sizes (``prune_layer``)."""
    copied = copy.deepcopy(layer)
    sizes = prune_layer(copied, adapter, plan.layers[index], plan.dense, fits)
    return finalize_layer(copied, index, adapter, hidden, sizes), sizes


def streamed_kls(source, plans: list[PruningPlan], fits: Fits | None, batches: Batches,
                 spill_bytes: Optional[int] = None) -> list[float]:
    """Per plan, the token-weighted mean KL(dense || pruned) over the predicted tokens of
    ``batches``; ``source``: a ``StreamedModel`` of the dense model (with its head)."""
    return streamed_sequence_kls(source, plans, fits, batches, spill_bytes).means()


def streamed_rounds(source, plans: list[PruningPlan], fits: Fits | None,
                    rounds: list[Batches]) -> Iterator[SequenceKls]:
    """What ``plan_check.calibration_rounds`` yields, from one streamed pass over every
    round's batches (a streamed pass reads every layer once, so it measures them all)."""
    kls = streamed_sequence_kls(source, plans, fits, [b for batches in rounds for b in batches])
    sequences = 0
    for batches in rounds:
        sequences += sum(len(ids) for ids, _ in batches)
        yield kls.head(sequences)


@torch.inference_mode()
def streamed_sequence_kls(source, plans: list[PruningPlan], fits: Fits | None,
                          batches: Batches, spill_bytes: Optional[int] = None) -> SequenceKls:
    """Per plan and per sequence of ``batches``, KL(dense || pruned) summed over its
    predicted tokens (``plan_check.SequenceKls``)."""
    device, hidden = source.device, source.model.config.get_text_config().hidden_size
    with contextlib.ExitStack() as stack:
        stores = [stack.enter_context(HiddenStore(spill_bytes)) for _ in range(len(plans) + 1)]
        recorded = []
        for number, (input_ids, attention_mask) in enumerate(batches):
            ids, mask = input_ids.to(device), attention_mask.to(device)       # (B, T)
            recorded.append(StreamBatch(record_batch(source, ids, mask, stores[0], number),
                                        None, ids, mask))
            for store in stores[1:]:
                store.put(number, stores[0].get(number))                      # embeddings
        for index in range(len(source.layers)):
            layer = source.load_layer(index)
            try:
                layers = [layer, *(pruned_layer(layer, index, plan, fits, source.adapter,
                                                hidden)[0] for plan in plans)]
                for number, batch in enumerate(recorded):
                    for store, run in zip(stores, layers):
                        store.put(number, _run(run, store.get(number).to(device),
                                               batch.calls[index], device))
                del layers
            finally:
                source.unload_layer(index)
        return _sequence_kls(source, stores, recorded)


def _sequence_kls(source, stores: list[HiddenStore], recorded: list[StreamBatch]) -> SequenceKls:
    kls = SequenceKls(len(stores) - 1)
    for number, batch in enumerate(recorded):
        kls.add(lambda: dense_terms(head_logits(source, stores[0].get(number), batch)),
                lambda i: head_logits(source, stores[i + 1].get(number), batch),
                batch.attention_mask)
    return kls
