"""One calibration pass for two statistics: the capture's moments and the Gram matrices.

The capture (``gprune.maths.capture``) and the Grams (``gprune.maths.gram``) hook the same
projection inputs of the same tokens; run separately they cost two forward passes per
source. ``capture_with_grams`` feeds both from one forward per batch (``JointPass``), so a
method that needs Grams adds only the Gram updates to the capture's cost. Each result is
exactly what its own pass would give (the hooks and the arithmetic are the same).
"""
from __future__ import annotations

import torch
from torch import nn

from gprune.maths.capture import ActivationCapture, CaptureResult, non_finite_error
from gprune.maths.gram import LEAF, GramCapture, GramResult, NonFiniteGramError, non_finite_message
from gprune.maths.hooked import HookedPass, JointPass, feed_batches
from gprune.models.adapters import FamilyAdapter


def capture_with_grams(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, batch_size: int, tau_act: float = 0.5,
                       label: str = "", progress: bool = True,
                       leaf: int = LEAF) -> tuple[CaptureResult, GramResult]:
    """Run ``input_ids`` (N, L) once through the model in batches; return the capture's
    statistics and every layer's Grams. A NaN/inf raises the error its own pass would."""
    capture = ActivationCapture(model, adapter, tau_act)
    grams = GramCapture(model, adapter, leaf)
    errors = (non_finite_error(label),
              lambda layer, kind: NonFiniteGramError(non_finite_message(layer, kind, label)))
    with JointPass([capture, grams]) as joint:
        feed_batches(joint, input_ids, attention_mask, batch_size,
                     f"capture+gram {label}".strip(), progress,
                     lambda layer, what: errors[joint.failed](layer, what))
    return capture.result(), GramResult(grams, grams.tokens)


def streamed_statistics(source, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        batch_size: int, tau_act: float = 0.5, label: str = "",
                        capture: bool = True, grams: bool = False, leaf: int = LEAF,
                        spill_bytes: int | None = None
                        ) -> tuple[CaptureResult | None, GramResult | None]:
    """``capture_statistics`` (``capture``), ``accumulate_grams`` (``grams``) or both, layer
    streamed (``gprune.maths.streaming``; ``source``: a ``StreamedModel``): equal results,
    the same errors. Each finished layer's Grams go to a file (``GramCapture.spill``)."""
    from gprune.maths.streaming import stream_pass

    parts: list[HookedPass] = []
    errors = []
    if capture:
        parts.append(ActivationCapture(source.model, source.adapter, tau_act,
                                       device=source.device))
        errors.append(non_finite_error(label))
    if grams:
        parts.append(GramCapture(source.model, source.adapter, leaf, device=source.device))
        errors.append(lambda layer, kind: NonFiniteGramError(
            non_finite_message(layer, kind, label)))
    joint = JointPass(parts)
    gram_part = parts[-1] if grams else None
    after = gram_part.spill if gram_part is not None else None
    stream_pass(source, joint, input_ids, attention_mask, batch_size,
                lambda layer, what: errors[joint.failed](layer, what), spill_bytes, after)
    return (parts[0].result() if capture else None,
            GramResult(gram_part, gram_part.tokens) if gram_part is not None else None)
