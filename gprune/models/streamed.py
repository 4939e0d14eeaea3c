"""A model for layer-streamed passes: a weightless skeleton whose layers load one at a time.

``StreamedModel(path, device)`` builds the family's CausalLM from its config with every
parameter on the ``meta`` device (``accelerate.init_empty_weights``: buffers such as the
rotary frequencies are computed as usual), then materializes on ``device`` everything that
is not a decoder layer (embeddings, final norm, head) from the ``.safetensors`` files:
their headers give each tensor's byte range, and nothing but the tensors asked for is read.
``load_layer(i)`` puts decoder layer ``i``'s weights on the device, ``unload_layer(i)``
returns them to ``meta``. Layers and parameter names are found through the adapter and
``named_modules`` (no attribute names here). Pruned checkpoints (per-layer widths) build
their own class from their config the same way.

When to stream (``stream="auto"``): when the model's weights, in the run's dtype, exceed
``FIT_FRACTION`` of the device memory that is free (CUDA: ``torch.cuda.mem_get_info``; CPU:
psutil's available memory; ``$GPRUNE_DEVICE_MEMORY``, in bytes, overrides either), the
rest being left to activations and statistics. Streaming needs, resident, the non-layer
weights, the largest layer and one batch's activations (``check_fits``); a model that does
not fit even that is refused in one line with the sizes.
"""
from __future__ import annotations

import contextlib

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from gprune.errors import GpruneError
from gprune.models.adapters import FamilyAdapter, adapter_for

log = logging.getLogger("gprune")
StreamMode = Literal["auto", "on", "off"]
FIT_FRACTION = 0.8
MEMORY_ENV = "GPRUNE_DEVICE_MEMORY"


class StreamingError(GpruneError):
    """A model that cannot be streamed (no safetensors files, or too big even per layer)."""


def weight_files(path: Path) -> list[Path]:
    """The ``.safetensors`` files of an HF folder; a one-line error when there are none."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise StreamingError(
            f"layer streaming reads .safetensors weights, and {path} has none; convert the "
            "model (load it with transformers and save_pretrained it, which writes "
            "model.safetensors), or run without streaming (stream=off)")
    return files


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(file: Path) -> tuple[dict, int]:
    """A ``.safetensors`` file's JSON header and the offset where its data starts."""
    with file.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size


class WeightIndex:
    """Tensor name -> (file, dtype, shape, byte range), from the ``.safetensors`` headers;
    ``get`` reads one tensor's bytes with a positional read. (A memory map would do too,
    but every page it touches stays in the process's resident set until the kernel
    reclaims it: reading all layers through one would show the whole file there.)"""

    def __init__(self, path: Path):
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for file in weight_files(path):
            header, data = read_header(file)
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    self.entries[name] = (file, entry["dtype"], entry["shape"],
                                          data + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.entries:
            raise StreamingError(f"the model's .safetensors files have no tensor {name!r}; "
                                 "is the folder a complete HF checkpoint?")
        file, kind, shape, offset, size = self.entries[name]
        data = bytearray(size)
        with file.open("rb", buffering=0) as handle:
            handle.seek(offset)
            handle.readinto(data)
        if size == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        tensor = torch.frombuffer(data, dtype=_DTYPES[kind]).reshape(shape)
        return tensor.to(device=device, dtype=dtype)

    def rows(self, name: str, index: torch.Tensor, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        """Rows ``index`` (k,) of the 2-D tensor ``name``, (k, width): one read per row."""
        if name not in self.entries:
            raise StreamingError(f"the model's .safetensors files have no tensor {name!r}; "
                                 "is the folder a complete HF checkpoint?")
        file, kind, shape, offset, size = self.entries[name]
        row_bytes = size // shape[0]
        data = bytearray(row_bytes * len(index))
        view = memoryview(data)
        with file.open("rb", buffering=0) as handle:
            for i, row in enumerate(index.tolist()):
                handle.seek(offset + row * row_bytes)
                handle.readinto(view[i * row_bytes:(i + 1) * row_bytes])
        table = torch.frombuffer(data, dtype=_DTYPES[kind]).reshape(len(index), shape[1])
        return table.to(device=device, dtype=dtype)                           # (k, width)


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor, buffer: bool) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    """A weightless model skeleton on ``device`` with decoder layers loaded on demand."""

    def __init__(self, path: Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, head: bool = True):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from gprune.models.loader import MODEL_LOAD_LOCK

        self.path, self.device, self.dtype = Path(path), torch.device(device), dtype
        self.index = WeightIndex(self.path)
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=True)
        with MODEL_LOAD_LOCK, init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
        self.model = model.eval()
        self.adapter: FamilyAdapter = adapter_for(model.config)
        self.layers = self.adapter.decoder_layers(model)
        names = {id(module): name for name, module in model.named_modules()}
        self.prefixes = [names[id(layer)] + "." for layer in self.layers]
        self._meta = [dict(layer.named_parameters()) for layer in self.layers]
        # head=False (calibration: no logits needed): the token embedding (and a head tied
        # to it) stays on meta; ``token_rows`` reads only the rows a batch uses
        embed = model.get_input_embeddings().weight
        self.embed_name = next((name for name, p in model.named_parameters(
            remove_duplicate=False) if p is embed and name in self.index), None)
        self.head = head or self.embed_name is None
        self._materialize_rest()

    def _in_layer(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.prefixes)

    def _materialize_rest(self) -> None:
        """Non-layer parameters from the files (a tied head shares the embedding), and
        every buffer, on the device."""
        model = self.model
        lazy = set() if self.head else {id(model.get_input_embeddings().weight)}
        if not self.head and model.get_output_embeddings() is not None:
            lazy.add(id(model.get_output_embeddings().weight))
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            if self._in_layer(name) or not param.is_meta or id(param) in lazy:
                continue
            if name not in self.index and model.config.get_text_config().tie_word_embeddings:
                continue   # the tied head: set below
            _set_tensor(model, name, self.index.get(name, self.device, self.dtype), False)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if self.head and head is not None and head.weight.is_meta:
            head.weight = embed.weight
        for name, buffer in list(model.named_buffers()):
            if name in self.index:
                buffer = self.index.get(name, self.device, buffer.dtype)
            _set_tensor(model, name, buffer.to(self.device), True)

    @contextlib.contextmanager
    def token_rows(self, input_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """Inside ``with``: ids (B, T) renumbered into a token embedding that holds only
        their rows (read from the files); without ``head`` the full table is never loaded."""
        if self.head:
            yield input_ids
            return
        embed = self.model.get_input_embeddings()
        meta, padding = embed.weight, getattr(embed, "padding_idx", None)
        embed.padding_idx = None     # renumbered rows; it only shapes gradients anyway
        used, local = torch.unique(input_ids, return_inverse=True)                  # (k,), (B, T)
        embed.weight = nn.Parameter(self.index.rows(self.embed_name, used.cpu(), self.device,
                                                    self.dtype), requires_grad=False)
        try:
            yield local.to(input_ids.device)
        finally:
            embed.weight, embed.padding_idx = meta, padding

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights read from the files onto the device."""
        layer, prefix = self.layers[index], self.prefixes[index]
        for name in self._meta[index]:
            _set_tensor(layer, name, self.index.get(prefix + name, self.device, self.dtype),
                        False)
        return layer

    def unload_layer(self, index: int) -> None:
        """Give layer ``index``'s weights back (its parameters are ``meta`` again)."""
        layer = self.layers[index]
        for name, param in self._meta[index].items():
            owner, _, leaf = name.rpartition(".")
            (layer.get_submodule(owner) if owner else layer)._parameters[leaf] = param

    # ---- sizes -------------------------------------------------------------------
    def layer_bytes(self, index: int) -> int:
        """Bytes of layer ``index``'s weights in the run's dtype."""
        return _bytes(self._meta[index].values(), self.dtype)

    def resident_bytes(self) -> int:
        """Bytes of the non-layer weights (embeddings, norm, head; a tied head once)."""
        return _bytes([p for p in {id(p): p for p in self.model.parameters()}.values()
                       if not p.is_meta], self.dtype)


def _bytes(params, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in params) * itemsize


# ---- when to stream ---------------------------------------------------------------
def available_bytes(device: str) -> int:
    """Free memory of ``device`` ($GPRUNE_DEVICE_MEMORY overrides, in bytes)."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return int(float(override))
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def model_weight_bytes(path: Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a folder's weights in ``dtype`` (from the file headers; .bin: file sizes)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return sum(f.stat().st_size for f in Path(path).glob("*.bin"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * sum(_numel(entry["shape"]) for file in files
                          for name, entry in read_header(file)[0].items()
                          if name != "__metadata__")


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def should_stream(mode: StreamMode, path: Path, device: str,
                  dtype: torch.dtype = torch.float32) -> bool:
    """``on``/``off`` as given; ``auto``: whether the weights exceed FIT_FRACTION of the
    free device memory. Streaming (``on``, or ``auto`` deciding so) needs safetensors."""
    if mode == "off":
        return False
    if mode == "auto" and model_weight_bytes(path, dtype) <= FIT_FRACTION * available_bytes(device):
        return False
    weight_files(path)
    return True


def check_fits(streamed: StreamedModel, batch_tokens: int, device: str) -> None:
    """Refuse, in one line with the sizes, a model whose resident weights, largest layer
    and one batch's activations exceed the free device memory. A batch's activations are
    counted as 3 hidden-state and 3 MLP-intermediate tensors (the layer's input, output and
    residual; the MLP's gate, up and product), in the run's dtype."""
    largest = max(range(len(streamed.layers)), key=streamed.layer_bytes)
    shape = streamed.adapter.shape(streamed.model.config)
    itemsize = torch.empty((), dtype=streamed.dtype).element_size()
    batch = 3 * batch_tokens * (shape.hidden + shape.intermediate) * itemsize
    need = streamed.resident_bytes() + streamed.layer_bytes(largest) + batch
    free = available_bytes(device)
    if need > free:
        raise StreamingError(
            f"the model does not fit on {device} even one layer at a time: embeddings/norm/"
            f"head {_gb(streamed.resident_bytes())} + layer {largest} "
            f"{_gb(streamed.layer_bytes(largest))} + one batch's activations {_gb(batch)} "
            f"= {_gb(need)} > {_gb(free)} free; lower the batch size or sequence length, or "
            "use a device with more memory")


def _gb(count: int) -> str:
    return f"{count / 1e9:.3g} GB"


def streamed_source(path: Path, device: str, mode: StreamMode, batch_tokens: int,
                    head: bool = True, dtype: torch.dtype = torch.float32
                    ) -> StreamedModel | None:
    """A ``StreamedModel`` that fits one layer at a time (else a one-line error) when
    ``mode`` says to stream the model at ``path``; None when it runs in memory."""
    if not should_stream(mode, path, device):
        return None
    streamed = StreamedModel(path, device, dtype=dtype, head=head)
    check_fits(streamed, batch_tokens, device)
    log.info("layer-streamed on %s (stream=%s): %s of float32 weights, %s free", device, mode,
             _gb(model_weight_bytes(path)), _gb(available_bytes(device)))
    return streamed


def open_model(path: Path, device: str, mode: StreamMode, batch_tokens: int,
               head: bool = True):
    """(model, tokenizer, adapter, streamed) for a pass over batches of ``batch_tokens``:
    the model loaded whole (``streamed`` None), or, when ``mode`` says to stream, the
    skeleton of a ``StreamedModel`` (``streamed_source``)."""
    from gprune.models.loader import load_model, load_tokenizer

    streamed = streamed_source(path, device, mode, batch_tokens, head)
    if streamed is None:
        model, tokenizer, adapter = load_model(path, device)
        return model, tokenizer, adapter, None
    return streamed.model, load_tokenizer(path), streamed.adapter, streamed
