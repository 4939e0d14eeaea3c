"""Stage 1 maths: hook a dense model and accumulate per-channel activation statistics.

``ActivationCapture`` hooks, in every decoder layer (found through the family
adapter, never by attribute name here):

- the input of the MLP output projection (``kind="mlp"``: one channel per MLP unit),
- the input of the attention output projection (``kind="attn"``: ``heads * head_dim``
  channels, head h owning channels ``h*head_dim .. (h+1)*head_dim - 1``; under GQA these
  are still per *query* head),
- the decoder layer's input and output hidden states (per-token cosine; a forward
  hook reads both after the layer ran).

Only the non-padding tokens of each batch enter the statistics: the attention mask
is turned once per forward into the list of flat row indices to keep. Hooks are
registered on ``__enter__`` and always removed on ``__exit__``. Nothing but the
running sums (see ``gprune.maths.moments``) outlives a forward pass.

On a CPU, float32 activations go through the compiled kernels of ``gprune.maths.native``
(one fused pass, the padding rows skipped by index); everything else, and every CPU without
a C compiler, through the pure-torch statistics of ``gprune.maths.moments``.
"""
from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from gprune.errors import GpruneError
from gprune.maths.hooked import HookedPass, feed_batches
from gprune.maths.moments import ChannelMoments, CosineSum, Workspace, default_chunk_elements
from gprune.maths.native import capture_kernels
from gprune.models.adapters import FamilyAdapter

KINDS = ("mlp", "attn")


class NonFiniteActivationError(GpruneError):
    """A NaN or inf reached a hooked activation."""


class ActivationCapture(HookedPass):
    """Context manager: hooks in place inside ``with``; feed batches with ``forward``."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, tau_act: float = 0.5,
                 device: torch.device | None = None):
        device = device or next(model.parameters()).device   # given: a weightless skeleton
        super().__init__(model, device)
        self.adapter = adapter
        self.layers = adapter.decoder_layers(model)
        self.workspace = Workspace(device)
        # one fused pass per activation on a CPU (float32); the torch path otherwise
        self.kernels = capture_kernels() if device.type == "cpu" else None
        self.paths_used: set[str] = set()   # "compiled" and/or "torch", for the manifest
        self.moments: dict[str, list[ChannelMoments]] = {
            "mlp": [ChannelMoments(adapter.mlp_output(layer).in_features, tau_act, device)
                    for layer in self.layers],
            "attn": [ChannelMoments(adapter.attn_output(layer).in_features, tau_act, device)
                     for layer in self.layers],
        }
        self.cosines = [CosineSum(device) for _ in self.layers]
        self._last_output: tuple = (None, None)   # previous layer: output, token norms

    # ---- hooks (their lifetime and the batch feeding: HookedPass) --------------
    def _register(self) -> None:
        for index, layer in enumerate(self.layers):
            self._track(layer.register_forward_hook(partial(self._on_layer, index),
                                                    with_kwargs=True))
            for kind, module in (("attn", self.adapter.attn_output(layer)),
                                 ("mlp", self.adapter.mlp_output(layer))):
                self._track(module.register_forward_pre_hook(
                    partial(self._on_channels, self.moments[kind][index])))

    def _end_batch(self) -> None:
        self._last_output = (None, None)

    def _chunks(self, hidden: torch.Tensor, rows_per_chunk: int,
                buffer: str) -> Iterator[torch.Tensor]:
        """(..., C) -> its non-padding tokens as successive (m, C) blocks, m <= rows_per_chunk.

        Without padding the blocks are views; with padding they are gathered into a reused
        buffer (valid until the next block).
        """
        flat = hidden.reshape(-1, hidden.shape[-1])                            # (B*T, C)
        rows = self._rows
        n = flat.shape[0] if rows is None else rows.numel()
        for start in range(0, n, rows_per_chunk):
            stop = min(start + rows_per_chunk, n)
            if rows is None:
                yield flat[start:stop]
            else:
                out = self.workspace.buffer(buffer, (stop - start, flat.shape[1]), flat.dtype)
                yield torch.index_select(flat, 0, rows[start:stop], out=out)

    def _on_channels(self, moments: ChannelMoments, module: nn.Module, args: tuple) -> None:
        if not self._feeding:
            return
        flat = args[0].reshape(-1, args[0].shape[-1])                          # (B*T, C)
        if self.kernels is not None and self.kernels.accepts(flat):
            moments.update_fused(self.kernels, flat, self._rows)
            self.paths_used.add("compiled")
            return
        self.paths_used.add("torch")
        with serial_on_this_thread(self.workspace.device):
            for chunk in self._chunks(flat, moments.chunk_rows, "capture.select"):
                moments.update(chunk, self.workspace)

    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict,
                  output) -> None:
        """Forward hook of a decoder layer: per-token cosine between its input and output.

        Reads the input after the layer ran: HF decoder layers never modify their input
        in place (checked for every supported family). A layer's output is the next
        layer's input, so its token norms are reused.
        """
        if not self._feeding:
            return
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, (tuple, list)) else output
        flat_in = hidden_in.reshape(-1, hidden_in.shape[-1])                    # (B*T, H)
        flat_out = hidden_out.reshape(-1, hidden_out.shape[-1])                 # (B*T, H)
        n = flat_out.shape[0] if self._rows is None else self._rows.numel()    # real tokens
        if self.kernels is not None and self.kernels.accepts(flat_in, flat_out):
            self.cosines[index].add(self.kernels.cosine_sum(flat_in, flat_out, self._rows), n)
            self.paths_used.add("compiled")
            return
        self.paths_used.add("torch")
        last_out, last_norms = self._last_output
        norms_in = last_norms if hidden_in is last_out else None
        width = hidden_out.shape[-1]
        rows_per_chunk = max(1, default_chunk_elements(self.workspace.device) // width)
        norms_out = self.workspace.buffer(f"capture.norms{index % 2}", (n,),
                                          norm_dtype(hidden_out.dtype))                 # (n,)
        blocks = zip(self._chunks(hidden_in, rows_per_chunk, "capture.layer_in"),
                     self._chunks(hidden_out, rows_per_chunk, "capture.layer_out"))
        with serial_on_this_thread(self.workspace.device):
            for start, (rows_in, rows_out) in zip(range(0, n, rows_per_chunk), blocks):
                stop = start + rows_out.shape[0]
                norm_in = norms_in[start:stop] if norms_in is not None else row_norms(rows_in)
                norm_out = row_norms(rows_out, out=norms_out[start:stop])               # (m,)
                self.cosines[index].update(rows_in, norm_in, rows_out, norm_out,
                                           self.workspace)
        self._last_output = (hidden_out, norms_out)

    # ---- results -------------------------------------------------------------
    def first_non_finite(self) -> tuple[int, str] | None:
        """(layer, what) of the first NaN/inf seen, in forward order; None if all finite.

        One host synchronization for the whole model.
        """
        checks = [(i, what, acc.finite()) for i in range(len(self.layers))
                  for what, acc in (("attention output-projection input", self.moments["attn"][i]),
                                    ("MLP output-projection input", self.moments["mlp"][i]),
                                    ("output hidden state", self.cosines[i]))]
        finite = torch.stack([ok for _, _, ok in checks]).cpu().tolist()
        for (layer, what, _), ok in zip(checks, finite):
            if not ok:
                return layer, what
        return None

    def channel_frame(self) -> pd.DataFrame:
        """One row per (layer, kind, channel); columns as in the capture artifact."""
        parts = []
        for index in range(len(self.layers)):
            for kind in KINDS:
                acc = self.moments[kind][index]
                parts.append(pd.DataFrame({
                    "layer": np.full(acc.channels, index, dtype=np.int32),
                    "kind": [kind] * acc.channels,
                    "channel": np.arange(acc.channels, dtype=np.int32),
                    "count": np.full(acc.channels, acc.count, dtype=np.int64),
                    "sum": acc.sum.cpu().numpy(), "sumsq": acc.sumsq.cpu().numpy(),
                    "sum_abs": acc.sum_abs.cpu().numpy(),
                    "active": acc.active_counts().cpu().numpy(),
                }))
        return pd.concat(parts, ignore_index=True)

    def result(self) -> "CaptureResult":
        return CaptureResult(self.channel_frame(), self.layer_frame(), self.tokens,
                             "+".join(sorted(self.paths_used)) or "none")

    def layer_frame(self) -> pd.DataFrame:
        """One row per decoder layer: cosine_sum, cosine_count."""
        return pd.DataFrame({
            "layer": np.arange(len(self.layers), dtype=np.int32),
            "cosine_sum": np.array([c.total.item() for c in self.cosines], dtype=np.float64),
            "cosine_count": np.array([c.count for c in self.cosines], dtype=np.int64),
        })


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Token norms are computed in float32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, H) -> (n,) Euclidean norms, computed in float32 at least."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=norm_dtype(rows.dtype), out=out)


def _openmp() -> ctypes.CDLL | None:
    """The process's OpenMP runtime (loaded globally with torch), if torch uses OpenMP."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        runtime = ctypes.CDLL(None)
        runtime.omp_get_max_threads, runtime.omp_set_num_threads   # noqa: B018 (lookup)
    except (OSError, AttributeError):
        return None
    return runtime


_OPENMP = _openmp()


@contextlib.contextmanager
def serial_on_this_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, run the hook's statistics without opening OpenMP parallel regions.

    They are many small, cache-sized operations: forking threads for each costs more than
    it saves, and on a loaded machine every parallel region can stall on a descheduled
    thread (measured: ~8 ms each, tens of times slower). OpenMP's thread count is a
    per-thread setting: only the calling thread's value changes, and it is restored before
    the model runs on. torch's process-wide setting (``torch.set_num_threads``: the default
    of threads started later, MKL) is never touched, so other threads' stages keep theirs.
    """
    threads = torch.get_num_threads()   # also initializes this thread's torch threading
    if device.type != "cpu" or _OPENMP is None or threads == 1:
        yield
        return
    _OPENMP.omp_set_num_threads(1)
    try:
        yield
    finally:
        _OPENMP.omp_set_num_threads(threads)


@dataclass
class CaptureResult:
    channels: pd.DataFrame
    layers: pd.DataFrame
    tokens: int
    statistics_path: str   # "compiled", "torch" or "compiled+torch": which code summed them


def capture_statistics(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, batch_size: int, tau_act: float = 0.5,
                       label: str = "", progress: bool = True) -> CaptureResult:
    """Run ``input_ids`` (N, L) through the model in batches; return the accumulated statistics.

    Raises NonFiniteActivationError naming the layer (and ``label``, the source) as soon
    as a batch brings a NaN or inf into any hooked activation of a real token.
    """
    with ActivationCapture(model, adapter, tau_act) as capture:
        feed_batches(capture, input_ids, attention_mask, batch_size,
                     f"capture {label}".strip(), progress, non_finite_error(label))
        return capture.result()


def non_finite_error(label: str) -> Callable[[int, str], Exception]:
    """(layer, what) -> the error naming them and the source ``label``."""
    where = f" of source {label!r}" if label else ""

    def error(layer: int, what: str) -> Exception:
        return NonFiniteActivationError(f"NaN or inf in the {what} of layer {layer}{where}; "
                                        "check the model weights and load the model in float32")
    return error
