"""Pruned checkpoints: the shipped modeling code, finalizing a sliced model, save and load.

A pruned checkpoint is a normal HF folder whose ``config.json`` keeps the family's
``model_type`` and adds ``gprune_layers`` (per-layer sizes) and an ``auto_map`` entry
pointing ``AutoModelForCausalLM`` at ``modeling_gprune.py``. That file is rendered from
``templates/modeling_gprune.py.tmpl`` with the family's HF class and attribute names
and imports only torch and transformers, so users load the checkpoint without gprune.

Inside gprune the same rendered source is imported in-process, so a model sliced in
memory is an instance of exactly the class a reload builds.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path
from string import Template
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gprune.errors import ArtifactError
from gprune.models.adapters import FamilyAdapter, adapter_for

MODELING_FILE = "modeling_gprune.py"
MANIFEST_FILE = "gprune_manifest.json"
_MODULES: dict[str, ModuleType] = {}


def class_name(adapter: FamilyAdapter) -> str:
    """Name of the pruned class in the shipped file, e.g. ``GpruneLlamaForCausalLM``."""
    return "Gprune" + adapter.hf_class


def render_modeling(adapter: FamilyAdapter) -> str:
    """Source of ``modeling_gprune.py`` for one family."""
    text = (resources.files("gprune.models") / "templates" / "modeling_gprune.py.tmpl").read_text()
    return Template(text).substitute(family=adapter.name, hf_class=adapter.hf_class,
                                     class_name=class_name(adapter),
                                     names=repr(adapter.names()))


def modeling_module(adapter: FamilyAdapter) -> ModuleType:
    """The rendered modeling code imported in-process (once per family)."""
    if adapter.name not in _MODULES:
        name = f"gprune_modeling_{adapter.name}"
        spec = importlib.util.spec_from_loader(name, loader=None)
        module = importlib.util.module_from_spec(spec)
        exec(compile(render_modeling(adapter), f"<{MODELING_FILE}:{adapter.name}>", "exec"),
             module.__dict__)
        sys.modules[name] = module
        _MODULES[adapter.name] = module
    return _MODULES[adapter.name]


def pruned_class(adapter: FamilyAdapter) -> type:
    return getattr(modeling_module(adapter), class_name(adapter))


def is_pruned(config: Any) -> bool:
    return getattr(config, "gprune_layers", None) is not None


def finalize(model: nn.Module, adapter: FamilyAdapter, sizes: list[dict]) -> nn.Module:
    """Turn a model whose weights were sliced in place into the pruned class.

    Sets per-layer KV repetition, swaps zero-head attention blocks for the empty block
    (keeping any output bias), records ``gprune_layers``/``auto_map`` in the config.
    """
    hidden = model.config.hidden_size
    for idx, (layer, spec) in enumerate(zip(adapter.decoder_layers(model), sizes, strict=True)):
        finalize_layer(layer, idx, adapter, hidden, spec)
    model.config.gprune_layers = [dict(s) for s in sizes]
    model.config.auto_map = {"AutoModelForCausalLM": f"modeling_gprune.{class_name(adapter)}"}
    model.__class__ = pruned_class(adapter)   # adds no state: same modules, same params
    return model


def finalize_layer(layer: nn.Module, idx: int, adapter: FamilyAdapter, hidden: int,
                   spec: dict) -> nn.Module:
    """One sliced decoder layer as the pruned class runs it: its attention's per-layer KV
    repetition, or the empty block when it keeps no query head."""
    module = modeling_module(adapter)
    if spec["num_heads"] == 0:
        _empty_attention(module, layer, idx, adapter, hidden, spec)
    else:
        module.set_head_counts(adapter.attn_module(layer), spec["num_heads"],
                               spec["num_kv_heads"])
    return layer


def _empty_attention(module: ModuleType, layer: nn.Module, idx: int,
                     adapter: FamilyAdapter, hidden: int, spec: dict) -> None:
    o = adapter.attn_output(layer)
    empty = module.GpruneEmptyAttention(adapter.attn_module(layer), idx, hidden,
                                        spec["attn_out_bias"])
    if o.bias is not None:
        with torch.no_grad():
            getattr(empty, adapter.o).bias.copy_(o.bias)
    setattr(layer, adapter.attn, empty)


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_pruned(model: nn.Module, tokenizer: Any, folder: str | Path,
                manifest: dict[str, Any]) -> Path:
    """Write a finalized pruned model as an HF folder: safetensors weights, config,
    tokenizer files, ``modeling_gprune.py`` and ``gprune_manifest.json``."""
    folder = Path(folder)
    if not is_pruned(model.config):
        raise ArtifactError("save_pruned needs a model finalized by gprune.models.pruned."
                            "finalize; run the surgery stage")
    model.save_pretrained(folder, safe_serialization=True)
    write_companions(folder, adapter_for(model.config), tokenizer, manifest)
    return folder


def write_companions(folder: Path, adapter: FamilyAdapter, tokenizer: Any,
                     manifest: dict[str, Any]) -> None:
    """What a pruned folder holds besides its weights and config: ``modeling_gprune.py``,
    the tokenizer files and ``gprune_manifest.json``."""
    (folder / MODELING_FILE).write_text(render_modeling(adapter))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True,
                                                   default=str))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The gprune manifest stored inside a pruned checkpoint folder."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a gprune pruned checkpoint (no {MANIFEST_FILE})")
    return json.loads(path.read_text())


def load_pruned(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a pruned checkpoint with gprune's in-process class (no remote code).

    Returns (model, tokenizer, adapter) like ``gprune.models.loader.load_model``.
    """
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if not is_pruned(config):
        raise ArtifactError(f"{folder} has no gprune_layers in config.json; it is not a "
                            "pruned checkpoint (load it with gprune.models.loader.load_model)")
    adapter = adapter_for(config)
    from gprune.models.loader import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # from_pretrained is not thread-safe (global meta-device patching)
        model = pruned_class(adapter).from_pretrained(folder, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer, adapter
