"""``gprune export gguf``: a pruned (or dense) Llama-family checkpoint as a llama.cpp GGUF.

The file uses llama.cpp's ``deci`` architecture, whose per-layer arrays
``deci.feed_forward_length``, ``deci.attention.head_count`` and
``deci.attention.head_count_kv`` let every layer keep its own MLP width and head counts.
The tensor maths (rope row order, folded biases, padding) is in
``gprune.maths.gguf_layout``; this module reads the checkpoint, checks it, and writes the
file under a temporary name that is renamed only once complete.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gprune.configs.export import OUTTYPES
from gprune.errors import ConfigError
from gprune.export.tokenizer import tokenizer_metadata
from gprune.maths.gguf_layout import deci_tensors

log = logging.getLogger(__name__)
FAMILIES = ("llama",)          # gprune adapter names the export supports
# f16 and q8_0 MLP widths are zero-padded (exactly) to multiples of 32: q8_0 blocks are 32
# wide, and ggml's fast CPU matmul (llamafile's tinyBLAS) takes f16 only when the inner
# dimension is a multiple of 16 (AVX-512; 8 with AVX2); other widths fall back to a path that
# made a 40%-pruned SmolLM2 prefill slower than the dense model (0.88x, measured). f32 keeps
# the checkpoint's exact widths.
PAD_FF = {"f32": 1, "f16": 32, "q8_0": 32}


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r} is not one gprune writes; choose one of "
                          f"{', '.join(OUTTYPES)} (llama.cpp's llama-quantize makes others "
                          "from the f16 file)")
    return outtype


def read_checkpoint(folder: Path) -> tuple[dict, list[dict]]:
    """(config.json, per-layer sizes) of a gprune pruned checkpoint or a dense HF folder."""
    config = json.loads((folder / "config.json").read_text())
    family = _family(config)
    if family not in FAMILIES:
        raise ConfigError(f"GGUF export supports the Llama family (SmolLM2) only; {folder} "
                          f"is {family}: export the dense model with llama.cpp's "
                          "convert_hf_to_gguf.py, or wait for gprune to support the family")
    if "gprune_layers" in config:
        from gprune.models.pruned import read_manifest

        read_manifest(folder)   # ArtifactError in one line if it is not gprune's
        return config, list(config["gprune_layers"])
    if config.get("auto_map"):
        raise ConfigError(f"{folder} is not a gprune checkpoint (custom modeling code but no "
                          "gprune_layers in config.json); give a folder written by gprune's "
                          "surgery stage, or a dense Llama-family HF folder")
    return config, [_dense_spec(config)] * config["num_hidden_layers"]


def _family(config: dict) -> str:
    from transformers import AutoConfig

    from gprune.models.adapters import adapter_for

    try:
        return adapter_for(AutoConfig.for_model(**config)).name
    except Exception:   # an unknown model_type: name it as the config does
        return str(config.get("model_type", "an unknown model type"))


def _dense_spec(config: dict) -> dict:
    return {"intermediate_size": config["intermediate_size"],
            "num_heads": config["num_attention_heads"],
            "num_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
            "mlp_out_bias": False, "attn_out_bias": False}


def hyperparameters(config: dict) -> dict[str, Any]:
    """Global llama.cpp hyperparameters from an HF Llama config (one-line errors)."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config.json sets {flag}; gprune's GGUF export does not "
                              "write input-projection biases yet")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"rope type {kind!r} is not supported by gprune's GGUF export yet "
                          "(default and linear are)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return {"hidden": hidden, "head_dim": config.get("head_dim") or hidden // heads,
            "layers": config["num_hidden_layers"], "eps": config["rms_norm_eps"],
            "context": config.get("max_position_embeddings", 2048),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "rope_linear": rope.get("factor") if kind == "linear" else None,
            "vocab": config["vocab_size"]}


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors weights; save the checkpoint with "
                          "safe_serialization=True")
    weights: dict = {}
    for path in files:
        weights.update(load_file(path))
    return weights


def export_gguf(folder: str | Path, outtype: str, out: str | Path) -> Path:
    """Write ``folder`` (a pruned or dense Llama-family HF folder) as a GGUF; returns its path."""
    folder, outtype = Path(folder), check_outtype(outtype)
    config, specs = read_checkpoint(folder)
    hp = hyperparameters(config)
    tensors, sizes = deci_tensors(load_weights(folder), specs, hp["head_dim"],
                                  pad_ff=PAD_FF[outtype])
    vocab = tokenizer_metadata(folder, hp["vocab"])
    out = Path(out)
    from gprune.export.gguf_write import write_atomic

    write_atomic(out, hp, sizes, tensors, vocab, outtype, name=folder.name)
    log.info("export: %s (%s, %.1f MB)", out, outtype, out.stat().st_size / 1e6)
    return out
