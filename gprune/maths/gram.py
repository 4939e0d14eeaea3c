"""Gram stage maths: hook a dense model and accumulate, per decoder layer, the Gram of [x, 1].

For the input x (d,) of the MLP output projection (``kind="mlp"``, d = intermediate size)
and of the attention output projection (``kind="attn"``, d = heads * head_dim, per *query*
head also under GQA) of every decoder layer (found through the family adapter, never by
attribute name here), ``GramCapture`` accumulates over the real (non-padding) tokens

    G = sum_t [x_t, 1] [x_t, 1]^T        a (d+1, d+1) float64 matrix:
    G[:d, :d] = sum x x^T,   G[:d, d] = G[d, :d] = sum x,   G[d, d] = token count.

Accumulation is float64 on the model's device. Each batch's real tokens are copied, in
chunks, into a reused (m, d) float64 block X and added as a symmetric rank-m update
G[:d, :d] += X^T X on the upper triangle only, plus the column sums G[:d, d] += X^T 1 and the
count G[d, d] += m. Keeping the ones column out of the products keeps their widths aligned:
SmolLM2's 1536 and 576 columns ran 3-14% faster than 1537 and 577 in a micro-benchmark on the
2-core CPU. The columns are halved recursively, each off-diagonal block is one ``torch.addmm``
and a diagonal block narrower than 2 * ``leaf`` (512) columns one full ``addmm``
(``update_macs`` counts it: SmolLM2's 1536-wide MLP Gram costs 0.63 of the full d^2 per
token, a 7B's 11008-wide one 0.52). All of it runs in torch's BLAS (MKL on CPUs, cuBLAS on
GPUs): a second BLAS in the process (SciPy's OpenBLAS ``dsyrk``) was measured to leave
spinning threads that slowed the model's own forward about 3x on 2 cores, and on the AMD
2-core VM it is no faster per multiply-add than the blocked update.
The matrix is symmetrized when read.

Hooks are registered in ``__enter__`` and always removed in ``__exit__``. A NaN/inf in an
input shows on the Gram's diagonal (checked per batch, O(d)); off-diagonal entries are then
finite by Cauchy-Schwarz.

A layer-streamed pass (``gprune.maths.calibrate.streamed_statistics``) writes each finished
layer's Grams to a float64 file (``GramCapture.spill``) and frees them, so only one layer's
accumulators are ever in memory.

Cost per source: ``gram_bytes`` = 8 * sum over layers of (d_mlp+1)^2 + (d_attn+1)^2 bytes
in memory (float64); 4 bytes per entry on disk in float32.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from gprune.errors import GpruneError
from gprune.maths.hooked import HookedPass, feed_batches
from gprune.models.adapters import FamilyAdapter

KINDS = ("mlp", "attn")
WHAT = {"mlp": "MLP output-projection input", "attn": "attention output-projection input"}


class NonFiniteGramError(GpruneError):
    """A NaN or inf reached a Gram matrix."""


LEAF = 256   # diagonal blocks narrower than 2 * LEAF are one full addmm


def default_chunk_elements(device: torch.device) -> int:
    """float64 elements of the reused (m, d) block: 32 MiB on a CPU, 256 MiB on a GPU."""
    return 2**22 if device.type == "cpu" else 2**25


def add_upper(acc: torch.Tensor, x: torch.Tensor, leaf: int = LEAF) -> None:
    """acc (w, w) += x^T x on and above the diagonal; x (m, w). Recursive column halving:
    the off-diagonal block is one addmm; diagonal blocks recurse until narrower than
    2 * ``leaf`` columns, then are one full addmm."""
    width = x.shape[1]
    if width < 2 * leaf:
        acc.addmm_(x.T, x)                                                   # (w, w)
        return
    half = width // 2
    add_upper(acc[:half, :half], x[:, :half], leaf)
    acc[:half, half:].addmm_(x[:, :half].T, x[:, half:])                     # (h, w-h)
    add_upper(acc[half:, half:], x[:, half:], leaf)


def update_macs(width: int, leaf: int = LEAF) -> int:
    """Multiply-adds per token of ``add_upper`` on a (width, width) Gram (full: width^2)."""
    if width < 2 * leaf:
        return width * width
    half = width // 2
    return update_macs(half, leaf) + half * (width - half) + update_macs(width - half, leaf)


class GramSum:
    """Running (d+1, d+1) float64 Gram of [x, 1] on one device (upper triangle updated)."""

    def __init__(self, width: int, device: torch.device, leaf: int = LEAF):
        self.width = width                                                  # d
        self.leaf = leaf
        self.device = device
        self._zeros: torch.Tensor | None = None   # allocated at the first update

    @property
    def _acc(self) -> torch.Tensor:
        """The (d+1, d+1) float64 accumulator (a streamed pass allocates one layer's at a
        time: a layer's Grams exist from its first update on)."""
        if self._zeros is None:
            self._zeros = torch.zeros(self.width + 1, self.width + 1, dtype=torch.float64,
                                      device=self.device)
        return self._zeros

    def add(self, block: torch.Tensor) -> None:
        """block (m, d) float64: G += [block, 1]^T [block, 1] on the upper triangle (the
        d x d products, then the sums column and the count)."""
        acc, d = self._acc, self.width
        add_upper(acc[:d, :d], block, self.leaf)                              # (d, d)
        acc[:d, d] += block.sum(0)                                            # (d,)
        acc[d, d] += block.shape[0]

    def diagonal_finite(self) -> torch.Tensor:
        """0-dim bool: every diagonal entry finite (NaN/inf in any input shows there)."""
        if self._zeros is None:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.diagonal(self._zeros)).all()

    def matrix(self) -> torch.Tensor:
        """The symmetric (d+1, d+1) float64 Gram (a new tensor)."""
        return torch.triu(self._acc) + torch.triu(self._acc, 1).T              # (d+1, d+1)


class SpilledGram:
    """A finished layer's symmetric Gram in a float64 file (streamed passes keep none in
    memory); same reading interface as ``GramSum``. Written under a temporary name, then
    renamed."""

    def __init__(self, gram: GramSum, path: Path):
        from safetensors.torch import save_file

        self.width = gram.width
        self._finite = bool(gram.diagonal_finite())
        save_file({"gram": gram.matrix().cpu().contiguous()}, str(path.with_suffix(".part")))
        path.with_suffix(".part").replace(path)
        self.path = path
        gram._zeros = None   # its hook still holds ``gram``: free the accumulator itself

    def diagonal_finite(self) -> torch.Tensor:
        return torch.tensor(self._finite)

    def matrix(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path))["gram"]                               # (d+1, d+1)


class GramCapture(HookedPass):
    """Context manager: hooks in place inside ``with``; feed batches with ``forward``.

    ``leaf``: diagonal blocks narrower than 2 * leaf are one full addmm (``add_upper``).
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, leaf: int = LEAF,
                 chunk_elements: int | None = None, device: torch.device | None = None):
        super().__init__(model, device or next(model.parameters()).device)
        self.layers = adapter.decoder_layers(model)
        self.leaf = leaf
        self.chunk_elements = chunk_elements or default_chunk_elements(self.device)
        self.modules = {"mlp": [adapter.mlp_output(layer) for layer in self.layers],
                        "attn": [adapter.attn_output(layer) for layer in self.layers]}
        self.sums = {kind: [GramSum(m.in_features, self.device, leaf) for m in modules]
                     for kind, modules in self.modules.items()}
        self._blocks: dict[int, torch.Tensor] = {}   # width d -> reused (rows, d) block
        self._spill_dir: tempfile.TemporaryDirectory | None = None

    def _register(self) -> None:
        for kind in KINDS:
            for module, gram in zip(self.modules[kind], self.sums[kind]):
                self._track(module.register_forward_pre_hook(partial(self._on_input, gram)))

    def _buffer(self, width: int) -> torch.Tensor:
        """The reused (capacity, d) float64 C-contiguous block of width d."""
        block = self._blocks.get(width)
        if block is None:
            capacity = max(64, self.chunk_elements // width)
            block = torch.empty(capacity, width, dtype=torch.float64, device=self.device)
            self._blocks[width] = block
        return block

    def _on_input(self, gram: GramSum, module: nn.Module, args: tuple) -> None:
        if not self._feeding:
            return
        flat = args[0].reshape(-1, gram.width)                                # (B*T, d)
        rows = self._rows
        n = flat.shape[0] if rows is None else rows.numel()
        buffer = self._buffer(gram.width)                                     # (cap, d)
        for start in range(0, n, buffer.shape[0]):
            stop = min(start + buffer.shape[0], n)
            part = flat[start:stop] if rows is None else flat.index_select(0, rows[start:stop])
            block = buffer[:stop - start]                                     # (m, d)
            block.copy_(part)                                                 # float32 -> 64
            gram.add(block)

    def first_non_finite(self) -> tuple[int, str] | None:
        """(layer, kind) of the first Gram with a NaN/inf, in forward order; None if none."""
        checks = [(i, kind) for i in range(len(self.layers)) for kind in ("attn", "mlp")]
        finite = torch.stack([self.sums[kind][i].diagonal_finite().to(self.device)
                              for i, kind in checks]).cpu().tolist()   # one host sync
        return next((where for where, ok in zip(checks, finite) if not ok), None)

    def spill(self, layer: int) -> None:
        """Write one layer's Grams to float64 files in a private temporary folder (removed
        with this object) and free their accumulators (streamed passes, after the layer)."""
        if self._spill_dir is None:
            self._spill_dir = tempfile.TemporaryDirectory(
                prefix="gprune-grams-", dir=os.environ.get("GPRUNE_STREAM_SPILL_DIR"))
        for kind in KINDS:
            path = Path(self._spill_dir.name) / f"layer_{layer:04d}_{kind}.safetensors"
            self.sums[kind][layer] = SpilledGram(self.sums[kind][layer], path)

    def matrices(self, layer: int) -> dict[str, torch.Tensor]:
        """{"mlp": (d_mlp+1, d_mlp+1), "attn": (d_attn+1, d_attn+1)} float64 of one layer."""
        return {kind: self.sums[kind][layer].matrix() for kind in KINDS}


@dataclass
class GramResult:
    """The accumulated Grams; ``layer(i)`` builds one layer's symmetric matrices at a time
    (so only one layer's copies exist next to the accumulators)."""

    capture: GramCapture
    tokens: int

    @property
    def num_layers(self) -> int:
        return len(self.capture.layers)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self.capture.matrices(index)


def accumulate_grams(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, batch_size: int, label: str = "",
                     progress: bool = True, leaf: int = LEAF) -> GramResult:
    """Run ``input_ids`` (N, L) through the model in batches; return every layer's Grams.

    Raises NonFiniteGramError naming the layer, the kind and ``label`` (the source) as soon
    as a batch brings a NaN or inf into a Gram.
    """
    with GramCapture(model, adapter, leaf) as capture:
        feed_batches(capture, input_ids, attention_mask, batch_size, f"gram {label}".strip(),
                     progress, lambda layer, kind: NonFiniteGramError(
                         non_finite_message(layer, kind, label)))
        return GramResult(capture, capture.tokens)


def non_finite_message(layer: int, kind: str, source: str) -> str:
    where = f" of source {source!r}" if source else ""
    return (f"NaN or inf in the {kind} Gram ({WHAT[kind]}) of layer {layer}{where}; check "
            "the model weights and load the model in float32")


# ---- cost ------------------------------------------------------------------------------
def gram_dims(model: nn.Module, adapter: FamilyAdapter) -> list[dict[str, int]]:
    """Per layer the input widths d: {"mlp": intermediate, "attn": heads * head_dim}."""
    return [{"mlp": adapter.mlp_output(layer).in_features,
             "attn": adapter.attn_output(layer).in_features}
            for layer in adapter.decoder_layers(model)]


def gram_bytes(dims: list[dict[str, int]], itemsize: int = 8,
               kinds: tuple[str, ...] = KINDS) -> int:
    """Bytes of one source's Grams: itemsize * sum over layers and kinds of (d+1)^2."""
    return itemsize * sum((layer[kind] + 1) ** 2 for layer in dims for kind in kinds)


def gram_flops_per_token(dims: list[dict[str, int]], leaf: int = LEAF) -> float:
    """FLOPs per token of the Gram updates as implemented: 2 per multiply-add of the blocked
    upper triangle (``update_macs``; d(d+1)/2 would be an exact syrk) and 1 per add of the
    sums column."""
    return sum(2.0 * update_macs(layer[kind], leaf) + layer[kind]
               for layer in dims for kind in KINDS)


def describe_cost(dims: list[dict[str, int]], storage_dtype: str) -> str:
    """One line: the memory of the float64 accumulators and the disk per source."""
    itemsize = 4 if storage_dtype == "float32" else 8
    widths = sorted({(d["mlp"], d["attn"]) for d in dims})
    shape = ", ".join(f"(d_mlp+1)^2 + (d_attn+1)^2 = {m + 1}^2 + {a + 1}^2" for m, a in widths)
    return (f"{len(dims)} layers x [{shape}] entries: "
            f"{gram_bytes(dims, 8) / 1e6:.1f} MB float64 in memory "
            f"(MLP side {gram_bytes(dims, 8, ('mlp',)) / 1e6:.1f} MB), "
            f"{gram_bytes(dims, itemsize) / 1e6:.1f} MB {storage_dtype} on disk per source")
