"""Surgery layer streamed: a pruned checkpoint written one decoder layer at a time.

In memory, surgery loads the dense model, slices (and refits) every layer in place and
saves the model (``gprune.models.pruned.save_pruned``). Streamed, the dense model is a
``StreamedModel`` (no layer weights in memory): each layer is read from the safetensors
files, a copy of it is sliced, refit and finalized exactly as in memory
(``gprune.maths.streamed_check.pruned_layer``), its tensors are written to their own shard
``model-<i>-of-<n>.safetensors`` and the layer is given back;
the non-layer weights (embeddings, final norm, an untied head) go to the last shard. The
folder then gets the HF shard index, the pruned config (``gprune_layers``, ``auto_map``,
the pruned class as its architecture), the rendered ``modeling_gprune.py``, the tokenizer
and the manifest, as ``save_pruned`` writes them. Peak memory: the non-layer weights, one
dense layer and its pruned copy. The folder is a pending artifact's: the store makes the
whole artifact appear at once (``artifacts.store``), as for ``save_pruned``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gprune.maths.plan import PruningPlan
from gprune.maths.surgery import Fits, check_dense
from gprune.models.pruned import class_name, param_count, write_companions

INDEX_FILE = "model.safetensors.index.json"


def save_pruned_streamed(source, plan: PruningPlan, fits: Fits | None, folder: str | Path,
                         tokenizer: Any, manifest: dict[str, Any], dtype: torch.dtype) -> dict:
    """Write ``plan`` applied to ``source`` (a ``StreamedModel``) as a pruned HF folder;
    return {"dense_params", "pruned_params"}. ``manifest`` is completed with them."""
    from gprune.maths.streamed_check import pruned_layer

    model, adapter = source.model, source.adapter
    check_dense(model, adapter, plan)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hidden = model.config.get_text_config().hidden_size
    shards = len(source.layers) + 1
    weight_map, sizes, pruned, total = {}, [], 0, 0
    for index in range(len(source.layers)):
        layer = source.load_layer(index)
        try:
            copied, layer_sizes = pruned_layer(layer, index, plan, fits, adapter, hidden)
        finally:
            source.unload_layer(index)
        sizes.append(layer_sizes)
        pruned += param_count(copied)
        state = {source.prefixes[index] + name: tensor
                 for name, tensor in copied.state_dict().items()}
        total += _write_shard(folder, _shard_name(index, shards), state, dtype, weight_map)
    resident = _resident_state(source)
    parameters = {name for name, _ in model.named_parameters()}
    pruned += sum(t.numel() for name, t in resident.items() if name in parameters)
    total += _write_shard(folder, _shard_name(shards - 1, shards), resident, dtype, weight_map)
    (folder / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2, sort_keys=True))
    counts = {"dense_params": param_count(model), "pruned_params": pruned}
    _pruned_config(model.config, adapter, sizes, dtype).save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_companions(folder, adapter, tokenizer, {**manifest, **counts})
    return counts


def _shard_name(index: int, shards: int) -> str:
    return f"model-{index + 1:05d}-of-{shards:05d}.safetensors"


def _write_shard(folder: Path, name: str, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 weight_map: dict[str, str]) -> int:
    """Write ``state`` (floating tensors cast to ``dtype``) as one shard; its bytes."""
    tensors = {key: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
               for key, t in state.items()}
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _resident_state(source) -> dict[str, torch.Tensor]:
    """The non-layer entries of the model's state dict, each tensor once (a head tied to
    the embedding is left out, as ``save_pretrained`` leaves it out)."""
    seen, state = set(), {}
    for name, tensor in source.model.state_dict(keep_vars=True).items():
        if (any(name.startswith(prefix) for prefix in source.prefixes) or tensor.is_meta
                or id(tensor) in seen):
            continue
        seen.add(id(tensor))
        state[name] = tensor
    return state


def _pruned_config(config, adapter, sizes: list[dict], dtype: torch.dtype):
    """The dense config with the pruned class's entries (as ``finalize`` and
    ``save_pretrained`` give them)."""
    pruned = copy.deepcopy(config)
    pruned.gprune_layers = [dict(s) for s in sizes]
    pruned.auto_map = {"AutoModelForCausalLM": f"modeling_gprune.{class_name(adapter)}"}
    pruned.architectures = [class_name(adapter)]
    pruned.dtype = dtype
    return pruned
