"""Pure maths of the GGUF export: HF Llama tensors -> llama.cpp ``deci`` tensors.

llama.cpp's ``deci`` architecture (src/models/deci.cpp) builds every layer from per-layer
arrays ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv``.
Three things in that graph shape what is written here (read in the vendored llama.cpp of
llama-cpp-python 0.3.36):

- A layer with 0 heads skips attention *and its output bias* ``attn_output.bias``, so a
  pruned block that keeps only the bias (gprune's empty attention) would be silently
  dropped. The bias is a constant added to the residual stream, so it is folded, exactly,
  into the output bias of the previous layer's MLP (``ffn_down.bias``).
- The head size is read from layer 0's head count (``n_embd / n_head(0)`` unless
  ``attention.key_length`` is set; 0 heads in layer 0 turn every head size to 0). Layer 0
  without heads therefore gets one head of zeros: its output is exactly 0 (+ its bias).
- A layer with ``feed_forward_length`` 0 ``continue``s before adding its attention output to
  the residual, so a layer whose MLP was removed gets a zero-weight MLP of width 1 (output
  exactly 0 + the MLP output bias). Widths are also zero-padded to ``pad_ff`` channels
  (the export uses 32 for f16 and q8_0: see ``gprune.export.gguf.PAD_FF``): zero gate/up
  rows and zero down columns add exactly nothing.

HF Llama rotates channel pairs (i, i + d/2) of each head; llama.cpp's "normal" rope (the
``deci`` rope type) rotates (2i, 2i + 1). Query and key rows are reordered per head to match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerSizes:
    """One decoder layer as llama.cpp reads it."""
    n_ff: int
    n_head: int
    n_head_kv: int


def interleave_order(head_dim: int) -> torch.Tensor:
    """Row order taking a head from HF's half-split rope layout to pairwise: 0, d/2, 1, ..."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).reshape(-1)


def rope_rows(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (``n_heads * head_dim`` rows)."""
    order = interleave_order(head_dim)
    rows = torch.cat([h * head_dim + order for h in range(n_heads)])
    return weight[rows]


def pad_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
            width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad an MLP to ``width`` channels (gate/up rows, down columns): same outputs."""
    extra = width - gate.shape[0]
    if extra <= 0:
        return gate, up, down
    zeros_in = gate.new_zeros(extra, gate.shape[1])
    return (torch.cat([gate, zeros_in]), torch.cat([up, zeros_in]),
            torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1))


def padded_width(n_ff: int, pad_ff: int) -> int:
    """Channels written for a layer that keeps ``n_ff``: 1 for an empty MLP (llama.cpp
    skips a 0-wide layer's attention output), else ``n_ff`` rounded up to ``pad_ff``."""
    return max(1, -(-n_ff // pad_ff) * pad_ff)


def fold_empty_attention_biases(biases: list[dict[str, torch.Tensor | None]],
                                heads: list[int]) -> list[dict[str, torch.Tensor | None]]:
    """Move the output bias of every head-less layer after the first into the MLP output
    bias of the layer before it (where llama.cpp adds it to the same residual stream).

    ``biases[i]`` holds ``attn`` and ``mlp`` output biases (or None) of layer i.
    Layer 0 keeps its own (it gets a zero head, whose output bias llama.cpp adds)."""
    out = [dict(b) for b in biases]
    for i in range(1, len(out)):
        attn = out[i]["attn"]
        if heads[i] == 0 and attn is not None:
            prev = out[i - 1]["mlp"]
            out[i - 1]["mlp"] = attn.clone() if prev is None else prev + attn
            out[i]["attn"] = None
    return out


def layer_sizes(specs: list[dict], pad_ff: int) -> list[LayerSizes]:
    """Per-layer sizes written to the GGUF (see the module docstring for the rules)."""
    sizes = []
    for i, spec in enumerate(specs):
        heads, kv = spec["num_heads"], spec["num_kv_heads"]
        if heads == 0:
            heads, kv = (1, 1) if i == 0 else (0, 0)
        sizes.append(LayerSizes(padded_width(spec["intermediate_size"], pad_ff), heads, kv))
    return sizes


def layer_tensors(w: Tensors, i: int, spec: dict, size: LayerSizes, head_dim: int,
                  bias: dict[str, torch.Tensor | None]) -> list[tuple[str, torch.Tensor]]:
    """The ``blk.{i}.*`` tensors of one HF Llama decoder layer (weights as (out, in))."""
    src, dst = f"model.layers.{i}.", f"blk.{i}."
    out: list[tuple[str, torch.Tensor]] = []
    heads = spec["num_heads"]
    if heads > 0:
        out += [("attn_norm.weight", w[src + "input_layernorm.weight"]),
                ("attn_q.weight", rope_rows(w[src + "self_attn.q_proj.weight"], heads, head_dim)),
                ("attn_k.weight", rope_rows(w[src + "self_attn.k_proj.weight"],
                                            spec["num_kv_heads"], head_dim)),
                ("attn_v.weight", w[src + "self_attn.v_proj.weight"]),
                ("attn_output.weight", w[src + "self_attn.o_proj.weight"])]
    elif size.n_head > 0:   # layer 0 without heads: one head of zeros (module docstring)
        hidden = w[src + "post_attention_layernorm.weight"].shape[0]
        zeros = torch.zeros(head_dim, hidden)
        out += [("attn_norm.weight", torch.ones(hidden)), ("attn_q.weight", zeros),
                ("attn_k.weight", zeros), ("attn_v.weight", zeros),
                ("attn_output.weight", torch.zeros(hidden, head_dim))]
    if bias["attn"] is not None:
        out.append(("attn_output.bias", bias["attn"]))
    out += _mlp_tensors(w, src, size.n_ff, bias["mlp"])
    return [(dst + name, t) for name, t in out]


def _mlp_tensors(w: Tensors, src: str, width: int,
                 bias: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    norm = w[src + "post_attention_layernorm.weight"]
    hidden = norm.shape[0]
    gate, up, down = (w.get(src + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
    if gate is None:   # an MLP with no channel left may be stored without weights
        gate, up, down = torch.zeros(0, hidden), torch.zeros(0, hidden), torch.zeros(hidden, 0)
    gate, up, down = pad_mlp(gate, up, down, width)
    out = [("ffn_norm.weight", norm), ("ffn_gate.weight", gate), ("ffn_up.weight", up),
           ("ffn_down.weight", down)]
    return out + ([("ffn_down.bias", bias)] if bias is not None else [])


def output_biases(w: Tensors, n_layers: int) -> list[dict[str, torch.Tensor | None]]:
    """The attention and MLP output biases of every layer (None where absent)."""
    return [{"attn": w.get(f"model.layers.{i}.self_attn.o_proj.bias"),
             "mlp": w.get(f"model.layers.{i}.mlp.down_proj.bias")} for i in range(n_layers)]


def deci_tensors(w: Tensors, specs: list[dict], head_dim: int,
                 pad_ff: int = 1) -> tuple[list[tuple[str, torch.Tensor]], list[LayerSizes]]:
    """Every GGUF tensor (float32, HF (out, in) layout) and the per-layer sizes.

    ``w``: the checkpoint's state dict; ``specs``: one ``gprune_layers`` entry per layer.
    Raises KeyError naming an HF tensor the layout needs and ``w`` lacks, and ValueError
    naming a tensor of ``w`` that nothing reads (nothing is dropped silently)."""
    w = {name: t.float() for name, t in w.items()}
    sizes = layer_sizes(specs, pad_ff)
    biases = fold_empty_attention_biases(output_biases(w, len(specs)),
                                         [s["num_heads"] for s in specs])
    out = [("token_embd.weight", w["model.embed_tokens.weight"]),
           ("output_norm.weight", w["model.norm.weight"])]
    if "lm_head.weight" in w:
        out.append(("output.weight", w["lm_head.weight"]))
    for i, (spec, size) in enumerate(zip(specs, sizes, strict=True)):
        out += layer_tensors(w, i, spec, size, head_dim, biases[i])
    _check_all_read(w, specs)
    return out, sizes


def _check_all_read(w: Tensors, specs: list[dict]) -> None:
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    parts = ("input_layernorm.weight", "post_attention_layernorm.weight",
             "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.gate_proj.weight",
             "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.down_proj.bias")
    known |= {f"model.layers.{i}.{p}" for i in range(len(specs)) for p in parts}
    unread = sorted(set(w) - known)
    if unread:
        raise ValueError(f"tensor {unread[0]} has no place in llama.cpp's deci layout")
