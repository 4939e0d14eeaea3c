"""Layer-streamed calibration and perplexity: one decoder layer's weights on the device at a time.

The in-memory passes run each batch through the whole decoder body. Streamed, the order
is swapped: every batch is first run through the body with the decoder layers' forwards
replaced by recorders (``record_batch``), which keep each layer's call arguments (attention
masks, sliding-window ones included, position embeddings: whatever the family's body
computes, found without attribute names) on the host and return their input unchanged; the
first layer's input (the embeddings, (B, T, H)) goes to a ``HiddenStore``. Then, for each
layer in order, ``run_layers`` loads its weights (``source.load_layer``), runs every batch's
hidden states through it with the recorded arguments and stores the output in place of the
input, and gives the weights back. The calibration passes' hooks (``ActivationCapture``,
``GramCapture``, ``JointPass``) are registered on the very layer modules, so they accumulate
exactly what they accumulate in memory. Perplexity ends with one more body run per batch in
which the first layer returns the streamed last hidden states and the others pass through:
the model's own final norm and head (and any logit soft-capping) give the logits.

Peak device memory: the non-layer weights, one layer, one batch's hidden states and the
layer's activations, plus the statistics' accumulators (a finished layer's Grams move to
the host on a GPU). Host memory: every batch's hidden states (N x T x H floats) and the
recorded arguments; past ``spill_bytes`` (``default_spill_bytes``) the hidden states go to
files in a private temporary folder, read back memory-mapped.

``source`` is any object with ``model`` (the CausalLM), ``layers``, ``device``,
``load_layer(i)`` and ``unload_layer(i)`` (``gprune.models.streamed.StreamedModel``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from gprune.maths.hooked import HookedPass, trim_batch

SPILL_ENV = "GPRUNE_STREAM_HOST_BYTES"     # host bytes of hidden states kept in memory
SPILL_DIR_ENV = "GPRUNE_STREAM_SPILL_DIR"  # where the spilled ones go (default: $TMPDIR)


def default_spill_bytes() -> int:
    """$GPRUNE_STREAM_HOST_BYTES, else half the host memory available now."""
    if os.environ.get(SPILL_ENV):
        return int(float(os.environ[SPILL_ENV]))
    import psutil

    return int(psutil.virtual_memory().available // 2)


class HiddenStore:
    """Per-batch hidden states (B, T, H) on the host; beyond ``spill_bytes`` in total, in
    files (written under a temporary name, then renamed; read memory-mapped)."""

    def __init__(self, spill_bytes: Optional[int] = None):
        self.spill_bytes = default_spill_bytes() if spill_bytes is None else spill_bytes
        self._memory: dict[int, torch.Tensor] = {}
        self._files: dict[int, Path] = {}
        self._folder: Optional[Path] = None
        self.in_memory_bytes = 0
        self.spilled_bytes = 0

    def put(self, index: int, hidden: torch.Tensor) -> None:
        host = hidden.detach().to("cpu")                                      # (B, T, H)
        size = host.numel() * host.element_size()
        old = self._memory.pop(index, None)
        if old is not None:
            self.in_memory_bytes -= old.numel() * old.element_size()
        if self.in_memory_bytes + size <= self.spill_bytes:
            self._memory[index] = host
            self.in_memory_bytes += size
            return
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="gprune-stream-",
                                                 dir=os.environ.get(SPILL_DIR_ENV)))
        path = self._folder / f"batch_{index:06d}.pt"
        torch.save(host.contiguous(), path.with_suffix(".part"))
        path.with_suffix(".part").replace(path)
        self._files[index] = path
        self.spilled_bytes = max(self.spilled_bytes, size * len(self._files))

    def get(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        return torch.load(self._files[index], mmap=True, weights_only=True)

    def close(self) -> None:
        self._memory.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "HiddenStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---- the layers' calls ---------------------------------------------------------------
@dataclass
class Call:
    """One decoder layer's call on one batch, less its hidden states (host tensors)."""

    args: tuple          # positional arguments after the hidden states
    kwargs: dict
    positional: bool     # the hidden states came first among ``args`` (else a keyword)


@dataclass
class StreamBatch:
    calls: list[Call]                 # per layer
    rows: Optional[torch.Tensor]      # flat indices of the real tokens (None: all)
    input_ids: torch.Tensor           # (B, T) as run
    attention_mask: torch.Tensor      # (B, T) as run


def _moved(value, device: torch.device, memo: dict):
    """``value`` with every tensor inside (tuples, lists, dicts) on ``device``, each once."""
    return mapped(value, lambda tensor: tensor.to(device), memo)


def mapped(value, convert: Callable[[torch.Tensor], torch.Tensor], memo: dict):
    """``value`` with ``convert`` applied to every tensor inside (tuples, lists, dicts),
    once per tensor (``memo``: id -> converted, so shared tensors stay shared)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = convert(value)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(mapped(v, convert, memo) for v in value)
    if isinstance(value, dict):
        return {k: mapped(v, convert, memo) for k, v in value.items()}
    return value


@contextlib.contextmanager
def replaced_forwards(layers: list[nn.Module],
                      make: Callable[[int], Callable]) -> Iterator[None]:
    """Inside ``with``, layer i's forward is ``make(i)`` (an instance attribute, so the
    module's hooks still fire around it: the passes ignore them, as they are fed only
    inside ``run_layers``); the class's forward is always restored."""
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    if args:
        return args[0], args[1:], kwargs, True
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest, False


@torch.inference_mode()
def record_batch(source, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 store: HiddenStore, index: int) -> list[Call]:
    """Run the body on one batch with recording layers; store the embeddings (B, T, H)
    under ``index``; return every layer's call (host tensors, shared ones stored once)."""
    calls: list[Optional[Call]] = [None] * len(source.layers)
    memo: dict = {}

    def make(i: int) -> Callable:
        def record(*args, **kwargs):
            hidden, rest, named, positional = _split(args, kwargs)
            if i == 0:
                store.put(index, hidden)
            calls[i] = Call(_moved(rest, torch.device("cpu"), memo),
                            _moved(named, torch.device("cpu"), memo), positional)
            return hidden
        return record

    with replaced_forwards(source.layers, make):
        source.model.base_model(input_ids=input_ids.to(source.device),
                                attention_mask=attention_mask.to(source.device),
                                use_cache=False)
    return calls


def _run(layer: nn.Module, hidden: torch.Tensor, call: Call, device: torch.device):
    memo: dict = {}
    args, kwargs = _moved(call.args, device, memo), _moved(call.kwargs, device, memo)
    out = layer(hidden, *args, **kwargs) if call.positional else \
        layer(*args, hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out                # (B, T, H)


@torch.inference_mode()
def run_layers(source, batches: list[StreamBatch], store: HiddenStore,
               hooked: Optional[HookedPass] = None,
               after_layer: Optional[Callable[[int], None]] = None) -> None:
    """Every layer in turn, loaded once, on every batch's stored hidden states (replaced by
    the layer's output); ``hooked`` (entered) is fed each batch's real rows;
    ``after_layer(i)`` runs once layer i has seen every batch."""
    for index, _ in enumerate(source.layers):
        layer = source.load_layer(index)
        try:
            for number, batch in enumerate(batches):
                hidden = store.get(number).to(source.device)                  # (B, T, H)
                if hooked is not None:
                    hooked._feed(batch.rows)
                try:
                    out = _run(layer, hidden, batch.calls[index], source.device)
                finally:
                    if hooked is not None:
                        hooked._stop_feeding()
                store.put(number, out)
                del hidden, out
        finally:
            source.unload_layer(index)
        if after_layer is not None:
            after_layer(index)


# ---- calibration and perplexity ---------------------------------------------------
def record_calibration(source, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       batch_size: int, store: HiddenStore) -> tuple[list[StreamBatch], int]:
    """Record every batch of ``input_ids`` (N, L), cut as ``HookedPass.forward`` cuts it
    (trailing all-padding columns dropped); return the batches and the real tokens."""
    batches, tokens = [], 0
    for start in range(0, int(input_ids.shape[0]), batch_size):
        trimmed = trim_batch(input_ids[start:start + batch_size],
                             attention_mask[start:start + batch_size], source.device)
        if trimmed is None:
            continue
        ids, mask, rows, added = trimmed
        rows_of = getattr(source, "token_rows", None)       # only the batch's embedding rows
        with rows_of(ids) if rows_of else contextlib.nullcontext(ids) as local_ids:
            calls = record_batch(source, local_ids, mask, store, len(batches))
        batches.append(StreamBatch(calls, rows, ids, mask))
        tokens += added
    return batches, tokens


def stream_pass(source, hooked: HookedPass, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, batch_size: int,
                error: Callable[[int, str], Exception], spill_bytes: Optional[int] = None,
                after_layer: Optional[Callable[[int], None]] = None) -> None:
    """``feed_batches`` streamed: ``hooked`` (built on ``source.model``, not entered)
    accumulates over ``input_ids`` (N, L) layer by layer; a NaN/inf raises ``error``."""
    def checked(index: int) -> None:
        bad = hooked.first_non_finite()
        if bad is not None:
            raise error(*bad)
        if after_layer is not None:
            after_layer(index)

    with HiddenStore(spill_bytes) as store, hooked:
        batches, tokens = record_calibration(source, input_ids, attention_mask, batch_size,
                                             store)
        hooked._count(tokens)
        run_layers(source, batches, store, hooked, checked)


@torch.inference_mode()
def streamed_window_nll(source, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        batch_size: int = 4, spill_bytes: Optional[int] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``evaluate.window_nll`` streamed: per-window NLL sums (float64) and counts (int64)."""
    from gprune.maths.evaluate import batch_nll

    with HiddenStore(spill_bytes) as store:
        batches = []
        for start in range(0, int(input_ids.shape[0]), batch_size):
            ids = input_ids[start:start + batch_size].to(source.device)       # (B, T)
            mask = attention_mask[start:start + batch_size].to(source.device)  # (B, T)
            batches.append(StreamBatch(record_batch(source, ids, mask, store, len(batches)),
                                       None, ids, mask))
        run_layers(source, batches, store)
        sums, counts = [], []
        for number, batch in enumerate(batches):
            logits = head_logits(source, store.get(number), batch)             # (B, T, V)
            total, count = batch_nll(logits, batch.input_ids, batch.attention_mask)
            sums.append(total)
            counts.append(count)
    return torch.cat(sums), torch.cat(counts).long()


@torch.inference_mode()
def head_logits(source, final: torch.Tensor, batch: StreamBatch) -> torch.Tensor:
    """The model's logits (B, T, V) from the last layer's output ``final`` (B, T, H): one
    body run in which the first layer returns ``final`` and the others pass it through, so
    the family's own final norm, head and any soft-capping apply."""
    return head_logits_of(source, final, batch)


def head_logits_of(source, final: torch.Tensor, batch: StreamBatch) -> torch.Tensor:
    """``head_logits`` in the caller's grad mode (a graph back to ``final`` when it needs one)."""
    final = final.to(source.device)
    with replaced_forwards(source.layers, lambda i: (
            (lambda *a, **k: final) if i == 0 else (lambda *a, **k: _split(a, k)[0]))):
        return source.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            use_cache=False).logits
