"""Evaluation maths: perplexity on fixed token windows, model size, FLOPs, speed.

Perplexity protocol: the caller gives fixed windows ``input_ids (n, L)`` with an
``attention_mask`` (1 = real token; padding only at the end of a window). Token
``t`` of a window is predicted from tokens ``< t`` of the same window only (no
stride, no context carried across windows); it counts when both it and its
predecessor are real tokens, so the first token of each window and padding are
never scored. ``ppl = exp(sum NLL / scored tokens)``; its standard error is
``ppl * sd(window mean NLL) / sqrt(windows)`` (delta method; NaN for one window).
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    stderr: float
    nll_sum: float
    tokens: int
    windows: int


LOGITS_BUDGET = 2**28   # logits elements per forward pass (1 GiB float32)


def windows_per_pass(batch_size: int, seq_len: int, vocab: int) -> int:
    """``batch_size`` capped so one pass's (windows, seq_len, vocab) logits fit
    ``LOGITS_BUDGET`` elements: a 262k vocabulary (Gemma 3) at 512 tokens takes 2 windows."""
    return max(1, min(batch_size, LOGITS_BUDGET // max(1, seq_len * vocab)))


@torch.no_grad()
def window_nll(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               batch_size: int = 4, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window summed next-token NLL (float64) and scored-token counts (int64).

    Windows go ``batch_size`` per pass, fewer where the logits would pass
    ``LOGITS_BUDGET``; the NLL is taken window by window (no flattened logits copy)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = windows_per_pass(batch_size, input_ids.shape[1], vocab)
    sums, counts = [], []
    starts = range(0, input_ids.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = input_ids[start:start + batch_size].to(device)
        mask = attention_mask[start:start + batch_size].to(device)
        total, count = batch_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        sums.append(total)
        counts.append(count)
    return torch.cat(sums), torch.cat(counts).long()


def batch_nll(logits: torch.Tensor, ids: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), ids and mask (B, T) -> per-window NLL sums (B,) float64 and scored
    counts (B,) on the host (see the module docstring for which tokens count); window by
    window (no flattened copy of the logits)."""
    targets = ids[:, 1:]                                                      # (B, T-1)
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    nll = torch.stack([F.cross_entropy(logits[i, :-1].float(), targets[i], reduction="none")
                       for i in range(len(ids))])                             # (B, T-1)
    return (nll.double() * valid).sum(dim=1).cpu(), valid.sum(dim=1).cpu()


def perplexity_from_nll(nll_sums: torch.Tensor, counts: torch.Tensor) -> Perplexity:
    """Token-weighted perplexity over windows, with a delta-method standard error."""
    keep = counts > 0
    sums, counts = nll_sums[keep].double(), counts[keep]
    tokens = int(counts.sum())
    if tokens == 0:
        raise ValueError("no scored tokens: every window is shorter than two tokens")
    total = float(sums.sum())
    ppl = math.exp(total / tokens)
    means = (sums / counts).tolist()
    stderr = ppl * statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan
    return Perplexity(ppl=ppl, stderr=stderr, nll_sum=total, tokens=tokens, windows=len(means))


def perplexity(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               batch_size: int = 4, progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` on fixed windows (see the module docstring)."""
    sums, counts = window_nll(model, input_ids, attention_mask, batch_size, progress)
    return perplexity_from_nll(sums, counts)


# ---- size and FLOPs ---------------------------------------------------------
def parameter_counts(model: nn.Module, adapter) -> dict[str, int]:
    """Total, non-embedding and prunable (MLP + attention projection) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    prunable = sum(p.numel() for lin in _prunable_linears(model, adapter)
                   for p in lin.parameters())
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": total, "params_non_embedding": total - embedding,
            "prunable_params": prunable, "bytes": size_bytes}


def flops_per_token(model: nn.Module, adapter, context: float,
                    lm_head_share: float = 1.0) -> float:
    """Forward FLOPs per token: 2 per linear weight plus attention scores and mixing.

    Attention costs ``4 * context * q_width`` per layer (QK^T and AV), where
    ``q_width`` is the layer's query-projection width (heads * head_dim) and
    ``context`` the number of attended positions (callers pass the mean causal
    context of a window, ``(L + 1) / 2``). ``lm_head_share``: the fraction of tokens
    that get logits (1 when every position is scored; 1/T for a generate() prefill).
    """
    lm_head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and m is not lm_head)
    attn = sum(4.0 * context * width for width in _query_widths(model, adapter))
    return 2.0 * linear + attn + 2.0 * lm_head.weight.numel() * lm_head_share


def _prunable_linears(model: nn.Module, adapter) -> list[nn.Linear]:
    found = []
    for layer in adapter.decoder_layers(model):
        found += [m for m in adapter.mlp_inputs(layer) + [adapter.mlp_output(layer)]
                  if isinstance(m, nn.Linear)]
        found += [m for m in _attn_linears(layer, adapter) if isinstance(m, nn.Linear)]
    return found


def _attn_linears(layer: nn.Module, adapter) -> list:
    """q, k, v, o of a layer; empty when the layer lost its whole attention block."""
    try:
        return [*adapter.attn_qkv(layer), adapter.attn_output(layer)]
    except AttributeError:
        return []


def _query_widths(model: nn.Module, adapter) -> list[int]:
    widths = []
    for layer in adapter.decoder_layers(model):
        linears = _attn_linears(layer, adapter)
        widths.append(linears[0].out_features if linears and
                      isinstance(linears[0], nn.Linear) else 0)
    return widths


# ---- speed ------------------------------------------------------------------
@torch.no_grad()
def measure_speed(model: nn.Module, prompt_len: int, decode_tokens: int, repeats: int = 3,
                  vocab_size: int | None = None, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Prefill and greedy KV-cached decode throughput (batch 1), median over repeats.

    Returns ``{"prefill_tokens_per_s": (median, stderr), "decode_tokens_per_s": ...}``.
    One untimed warm-up run precedes the timed ones.
    """
    return measure_speeds({"model": model}, prompt_len, decode_tokens, repeats, vocab_size,
                          seed)["model"]


@torch.no_grad()
def measure_speeds(models: dict[str, nn.Module], prompt_len: int, decode_tokens: int,
                   repeats: int = 3, vocab_size: int | None = None,
                   seed: int = 0) -> dict[str, dict[str, tuple[float, float]]]:
    """``measure_speed`` of several models (same vocabulary), their runs interleaved.

    After one untimed warm-up run of each model, repeat ``r`` times every model once, the
    order rotated by ``r`` (as ``benchmarks/speed.py`` does), so a slow drift of the
    machine's load hits every model alike. With two or more models each model but the
    first also gets ``prefill_speedup`` and ``decode_speedup`` over the first: the median
    over repeats of its tokens/s divided by the first model's in the same repeat.
    """
    names = list(models)
    first = models[names[0]]
    device = next(first.parameters()).device
    vocab = vocab_size or first.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    for name in names:  # warm-up
        _one_speed_run(models[name], ids, decode_tokens)
    prefill: dict[str, list[float]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t_prefill, t_decode = _one_speed_run(models[name], ids, decode_tokens)
            prefill[name].append(prompt_len / t_prefill)
            decode[name].append(decode_tokens / t_decode)
    out = {n: {"prefill_tokens_per_s": _median_se(prefill[n]),
               "decode_tokens_per_s": _median_se(decode[n])} for n in names}
    for name in names[1:]:
        out[name]["prefill_speedup"] = _median_se(
            [a / b for a, b in zip(prefill[name], prefill[names[0]])])
        out[name]["decode_speedup"] = _median_se(
            [a / b for a, b in zip(decode[name], decode[names[0]])])
    return out


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` from transformers 5.24 (the old
    ``past_key_values`` warns there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def _one_speed_run(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    keyword = cache_keyword(model)
    start = _now(ids.device)
    out = model(input_ids=ids, use_cache=True)
    t_prefill = _now(ids.device) - start
    past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    start = _now(ids.device)
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{keyword: past})
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    t_decode = _now(ids.device) - start
    return max(t_prefill, 1e-9), max(t_decode, 1e-9)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(statistics.median(values)), float(se)
