"""A calibration pass with hooks: what the capture and the gram accumulators share.

``HookedPass`` registers its subclass's hooks on ``__enter__`` and always removes them on
``__exit__``; ``forward`` runs one padded batch (B, T) through the decoder body with the
trailing all-padding columns cut off (a causal model's earlier tokens cannot see them),
sets ``_rows`` (flat indices of the real tokens; None when there is no padding) and
``_feeding`` for the hooks while the batch runs, and counts the real tokens.
``feed_batches`` drives a pass over all calibration rows with a progress bar and stops
at the first batch that brings a NaN or inf (``first_non_finite``). ``JointPass`` runs
several passes (the capture's moments and the Grams) on one forward per batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm


class HookedPass:
    """Context manager: hooks in place inside ``with``; feed batches with ``forward``."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.tokens = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._rows: Optional[torch.Tensor] = None   # flat indices of the non-padding tokens
        self._feeding = False

    def _register(self) -> None:
        """Register the hooks (through ``_track``)."""
        raise NotImplementedError

    def _end_batch(self) -> None:
        """Called after every batch, even a failed one (per-batch state to drop)."""

    def first_non_finite(self) -> Optional[tuple[int, str]]:
        """(layer, what) of the first NaN/inf accumulated, or None."""
        raise NotImplementedError

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove_hooks()

    def _track(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """Run the decoder body on one batch (B, T); return the non-padding tokens it added."""
        if not self._handles:
            raise RuntimeError(f"{type(self).__name__}.forward needs the hooks: use it "
                               "inside `with`")
        trimmed = trim_batch(input_ids, attention_mask, self.device)
        if trimmed is None:
            return 0
        ids, mask, rows, added = trimmed
        self._feed(rows)
        try:
            self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            self._stop_feeding()
        self._count(added)
        return added

    def _feed(self, rows: Optional[torch.Tensor]) -> None:
        """The hooks see a batch from now on; ``rows``: its real tokens (None: all)."""
        self._rows = rows
        self._feeding = True

    def _stop_feeding(self) -> None:
        self._feeding = False
        self._rows = None
        self._end_batch()

    def _count(self, tokens: int) -> None:
        self.tokens += tokens


def trim_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device
               ) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]]:
    """A batch (B, T) as the passes run it: (input_ids (B, W), attention_mask (B, W) long,
    flat indices of the real tokens (None: all real), real tokens), on ``device``, with the
    trailing all-padding columns cut off (a causal model's earlier tokens cannot see them);
    None when the batch has no real token."""
    mask = attention_mask.to(device=device, dtype=torch.bool)                 # (B, T)
    if not bool(mask.any()):
        return None
    width = int(mask.any(0).nonzero().max()) + 1
    mask = mask[:, :width]
    flat = mask.reshape(-1)                                                   # (B*W,)
    rows = None if bool(flat.all()) else flat.nonzero().squeeze(1)            # (n,)
    return input_ids[:, :width].to(device), mask.long(), rows, int(flat.sum())


class JointPass(HookedPass):
    """Several passes over one model fed by one forward per batch (their hooks all run).

    ``first_non_finite`` reports the first part (in the given order) that saw a NaN/inf;
    ``failed`` is then that part's index, so the caller can name what failed."""

    def __init__(self, parts: list[HookedPass]):
        if not parts or any(p.model is not parts[0].model for p in parts):
            raise ValueError("JointPass needs at least one pass, all on the same model")
        super().__init__(parts[0].model, parts[0].device)
        self.parts = parts
        self.failed: Optional[int] = None

    def _register(self) -> None:
        for part in self.parts:
            part._register()
            self._handles.extend(part._handles)   # the joint pass owns (and removes) them
            part._handles = []

    def _feed(self, rows: Optional[torch.Tensor]) -> None:
        super()._feed(rows)
        for part in self.parts:
            part._feed(rows)

    def _stop_feeding(self) -> None:
        super()._stop_feeding()
        for part in self.parts:
            part._stop_feeding()

    def _count(self, tokens: int) -> None:
        super()._count(tokens)
        for part in self.parts:
            part._count(tokens)

    def first_non_finite(self) -> Optional[tuple[int, str]]:
        for index, part in enumerate(self.parts):
            bad = part.first_non_finite()
            if bad is not None:
                self.failed = index
                return bad
        return None


def feed_batches(hooked: HookedPass, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 batch_size: int, desc: str, progress: bool,
                 error: Callable[[int, str], Exception]) -> None:
    """Run ``input_ids`` (N, L) through ``hooked`` (entered) in batches of ``batch_size``;
    raise ``error(layer, what)`` at the first batch that brings a NaN or inf."""
    bar = tqdm(total=int(attention_mask.sum()), unit="tok", disable=not progress, desc=desc)
    with bar:
        for start in range(0, int(input_ids.shape[0]), batch_size):
            stop = start + batch_size
            bar.update(hooked.forward(input_ids[start:stop], attention_mask[start:stop]))
            bad = hooked.first_non_finite()
            if bad is not None:
                raise error(*bad)
