"""Running float64 statistics of activations, without keeping the activations.

``ChannelMoments`` accumulates, per input channel c of one linear layer, over the
tokens it is fed (rows of an ``(n, C)`` tensor):

- ``count``   number of tokens (the same for every channel),
- ``sum``     sum of x_c,           ``sumsq``   sum of x_c^2,
- ``sum_abs`` sum of |x_c|,
- ``active``  number of tokens with |x_c| > tau_act * RMS_t, where RMS_t is the root
  mean square over the C channels of that same input vector at that token
  (sqrt(mean_c x_tc^2)). So "active" is relative to the token's own activation
  scale: a channel carrying a fair share of the vector's energy counts as firing.

``CosineSum`` accumulates, for one decoder layer, the per-token cosine between the
hidden state entering and leaving the layer (sum and count; mean = sum / count).

Channel statistics are computed in float64 (column sums of successive transforms of
one float64 copy of a chunk); per-token cosines in float32, summed in float64. Both work on
whatever device their tensors live on and do no host synchronization. Temporaries go
through a ``Workspace`` of reused buffers: fresh multi-megabyte allocations per call cost
more than the reductions themselves on a CPU.

No BLAS call is made (sums are ATen reductions): MKL would thread even a small gemv.

This is the reference path (GPUs, non-float32 activations, machines without a C compiler);
on a CPU the capture hooks normally call the fused kernels of ``gprune.maths.native``
through ``ChannelMoments.update_fused`` and ``CosineSum.add``, which tests hold to it.
"""
from __future__ import annotations

import math

import torch

# Rows are processed in chunks of about this many elements: on a CPU a chunk that stays in
# the L2 cache (128K float64 = 1 MiB) makes the successive passes nearly free; on a GPU
# big chunks keep the launch count low (16M float64 = 128 MiB of workspace at most).
CPU_CHUNK_ELEMENTS = 1 << 17
GPU_CHUNK_ELEMENTS = 1 << 24


def default_chunk_elements(device: torch.device | str) -> int:
    return CPU_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS


class Workspace:
    """Named flat buffers, grown on demand and reused; views are handed out by shape."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._buffers.get((name, dtype))
        if flat is None or flat.numel() < numel:
            flat = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = flat
        return flat[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held by the reused buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


class ChannelMoments:
    """Count, sum, sum of squares, sum of |x| and active count per channel, in float64."""

    def __init__(self, channels: int, tau_act: float, device: torch.device | str,
                 chunk_elements: int | None = None):
        self.channels = channels
        self.tau_act = float(tau_act)
        chunk_elements = chunk_elements or default_chunk_elements(device)
        self.chunk_rows = max(1, chunk_elements // channels)
        self.count = 0
        # rows: sum, sum of |x|, sum of x^2, active count (integers, exact in float64)
        self.totals = torch.zeros(4, channels, dtype=torch.float64, device=device)  # (4, C)
        self.sum, self.sum_abs, self.sumsq, self.active = self.totals.unbind(0)     # (C,) views

    def update(self, rows: torch.Tensor, workspace: Workspace) -> None:
        """Add the tokens of ``rows`` (n, C), any float dtype, to the statistics."""
        n, width = rows.shape
        x = workspace.buffer("moments.x", (min(n, self.chunk_rows), width), torch.float64)
        partial = workspace.buffer("moments.partial", (4, width), torch.float64)
        for start in range(0, n, self.chunk_rows):
            chunk = rows[start:start + self.chunk_rows]
            self._add_chunk(x[:chunk.shape[0]].copy_(chunk), partial)
        self.count += int(n)

    def _add_chunk(self, x: torch.Tensor, partial: torch.Tensor) -> None:
        """x (m, C) float64, overwritten: column sums of x, |x|, x^2, [x^2 > tau^2 mean x^2]."""
        torch.sum(x, 0, out=partial[0])
        torch.sum(x.abs_(), 0, out=partial[1])
        torch.sum(x.square_(), 0, out=partial[2])
        # |x| > tau * RMS_t  <=>  x^2 > tau^2 * mean_c x^2 at token t; threshold (m, 1)
        threshold = x.sum(1, keepdim=True).mul_(self.tau_act ** 2 / self.channels)
        torch.sum(torch.gt(x, threshold, out=x), 0, out=partial[3])
        self.totals.add_(partial)

    def update_fused(self, kernels, x: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Add the rows of x (N, C) selected by ``rows`` (all if None) in one compiled pass.

        ``kernels``: a ``gprune.maths.native.CaptureKernels`` that accepts ``x``.
        """
        self.count += kernels.channel_moments(x, rows, self.tau_act, self.totals)

    # ---- derived -----------------------------------------------------------
    def mean(self) -> torch.Tensor:
        """(C,) mean of x_c."""
        return self.sum / max(self.count, 1)

    def var(self) -> torch.Tensor:
        """(C,) population variance of x_c."""
        return (self.sumsq / max(self.count, 1) - self.mean() ** 2).clamp_min(0.0)

    def active_counts(self) -> torch.Tensor:
        """(C,) int64 number of tokens where the channel was active."""
        return self.active.round().long()

    def finite(self) -> torch.Tensor:
        """0-dim bool: no NaN or inf ever entered (sums of x^2 carry any NaN/inf on)."""
        return torch.isfinite(self.sumsq).all()


class CosineSum:
    """Sum and count of per-token cosines between a layer's input and output hidden states."""

    def __init__(self, device: torch.device | str):
        self.count = 0
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, hidden_in: torch.Tensor, norm_in: torch.Tensor, hidden_out: torch.Tensor,
               norm_out: torch.Tensor, workspace: Workspace) -> None:
        """Add tokens: hidden states (n, H) with their norms (n,).

        The norms are passed in because a layer's output is the next layer's input.
        Per-token cosines are computed in float32 (float64 inputs stay float64) and summed
        in float64.
        """
        n, width = hidden_in.shape
        dtype = torch.float64 if hidden_in.dtype == torch.float64 else torch.float32
        product = workspace.buffer("cosine.product", (n, width), dtype)
        dot = torch.mul(hidden_in, hidden_out, out=product).sum(dim=1)              # (n,)
        cosine = dot / (norm_in * norm_out).clamp_min(torch.finfo(dtype).tiny)       # (n,)
        self.total += cosine.sum(dtype=torch.float64)
        self.count += int(hidden_in.shape[0])

    def add(self, cosine_total: float, count: int) -> None:
        """Add ``count`` tokens whose cosines sum to ``cosine_total`` (computed elsewhere)."""
        self.total += cosine_total
        self.count += int(count)

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.total)
