"""The precision a throwaway pruned copy runs in: bfloat16 matrix products where the device
has native bfloat16 arithmetic, for the KL check's students only.

On a CPU with AMX or AVX512-BF16 (e.g. Sapphire Rapids) a bfloat16 matrix product runs 3-5x
faster than a float32 one, and a SmolLM2 forward about 2x; on a CUDA GPU with bfloat16 it is
the usual inference precision. Where neither holds, bfloat16 is slower than float32, so
``resolve_precision("auto", device)`` chooses float32 there.

``in_precision`` casts a model's linear layers' weights to bfloat16 once (the model is a
copy the caller owns) and runs its forward under autocast, so the norms, softmax and the
residual stream stay float32 and only the matrix products round their inputs to bfloat16.
Measured on SmolLM2's KL check (docs/METHOD_NOTES.md): every plan's KL to dense within
0.002 of float32 at 10-50% sparsity, the same plan chosen at every target.
"""
from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: str) -> bool:
    """Does ``device`` multiply bfloat16 matrices natively (faster than float32)?"""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")   # torch >= 2.3
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(precision: str, device: str) -> str:
    """``precision`` ("auto" | "float32" | "bfloat16") made concrete for ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


class Autocast(nn.Module):
    """``model`` whose forward runs under bfloat16 autocast on its device."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.device_type = next(model.parameters()).device.type

    def forward(self, **inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(**inputs)


def in_precision(model: nn.Module, precision: str) -> nn.Module:
    """``model`` itself (float32) or, for "bfloat16", an ``Autocast`` of it with its linear
    layers' weights cast to bfloat16 in place (tied weights become untied copies)."""
    if precision == "float32":
        return model
    if precision != "bfloat16":
        raise ValueError(f"in_precision takes float32 or bfloat16, not {precision!r}")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    return Autocast(model)
