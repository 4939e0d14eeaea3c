"""Stage 2 maths: per-unit base metrics, per-source ranks, sensitivity, magnitude, frequency.

Pure functions on tensors / arrays (the only model access, ``layer_weights``, goes
through the family adapter). Units: an MLP channel, or a query head whose score
aggregates its ``head_dim`` input channels of the attention output projection.

Per channel c with input statistics (count n, sum, sum of squares) and output
projection W_out (out, C):

- wanda_sp(c) = RMS(x_c) * mean_i |W_out[i, c]|,  RMS = sqrt(sumsq / n), so sources
  with different token counts compare;
- flap(c)     = Var[x_c] * ||W_out[:, c]||^2,  Var the population variance;
- a head's score is the sum over its channels.

FLAP's standardized score of a unit (``m_pooled_z`` / ``m_magnitude_z``, the columns a
global threshold compares; An et al. 2024, reference code ``lib/prune.py``, AL-AM):

- MLP channel: (s_c - mean) / std over the layer's channels (std with ddof=1);
- head: square each of the layer's H * head_dim channel scores, standardize them over
  the layer (ddof=1), and average over the head's channels. Standardizing over channels,
  not over the layer's few heads, keeps a layer whose heads are all alike from always
  having "weak" heads.

Within one layer and unit kind, with s(u, d) the score of unit u on source d:

- rank r(u, d): average rank (ties averaged) scaled to [0, 1], highest score -> 1
  (a lone unit gets 1);
- sensitivity: population standard deviation over d of r(u, d) (NaN for one source);
- magnitude: mean over d of s(u, d) / mean_u s(., d) (0 where that mean is 0);
- peak: the largest over d of the same ratio (a unit that matters to any one source);
- pooled: the metric from the statistics summed over all sources.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from gprune.models.adapters import FamilyAdapter

@dataclass(frozen=True)
class LayerWeights:
    """The weights one layer's unit scores need."""

    mlp_out: torch.Tensor               # (hidden, I)
    mlp_in: tuple[torch.Tensor, ...]    # each (I, hidden): (gate, up) or (fc_in,)
    attn_out: torch.Tensor              # (hidden, H * head_dim)
    attn_q: torch.Tensor                # (H * head_dim, hidden)

    def float64(self) -> "LayerWeights":
        """A float64 CPU copy (made one layer at a time, so a whole model never is)."""
        def f64(weight: torch.Tensor) -> torch.Tensor:
            return weight.detach().to("cpu", torch.float64)

        return LayerWeights(f64(self.mlp_out), tuple(f64(w) for w in self.mlp_in),
                            f64(self.attn_out), f64(self.attn_q))


def layer_weights(model: nn.Module, adapter: FamilyAdapter) -> list[LayerWeights]:
    """Per decoder layer, the projections that define its units (found via the adapter).

    The tensors are the model's own (no copy); use ``LayerWeights.float64`` per layer.
    """
    return [LayerWeights(mlp_out=adapter.mlp_output(layer).weight,
                         mlp_in=tuple(m.weight for m in adapter.mlp_inputs(layer)),
                         attn_out=adapter.attn_output(layer).weight,
                         attn_q=adapter.attn_qkv(layer)[0].weight)
            for layer in adapter.decoder_layers(model)]


# ---- per-channel moments ------------------------------------------------------
def channel_rms(sumsq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(C,) root mean square of each channel."""
    return torch.sqrt(sumsq / count.clamp_min(1))


def channel_var(total: torch.Tensor, sumsq: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(C,) population variance of each channel (clamped at 0 against rounding)."""
    n = count.clamp_min(1)
    return (sumsq / n - (total / n) ** 2).clamp_min(0.0)


# ---- base metrics per channel -------------------------------------------------
def wanda_sp_channels(rms: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """(C,) RMS(x_c) * mean_i |W_out[i, c]|; w_out (out, C)."""
    return rms * w_out.abs().mean(dim=0)


def flap_channels(var: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """(C,) Var[x_c] * ||W_out[:, c]||^2; w_out (out, C)."""
    return var * w_out.square().sum(dim=0)


def heads_sum(per_channel: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H * head_dim,) -> (H,): a query head aggregates its head_dim channels by summing."""
    return per_channel.reshape(-1, head_dim).sum(dim=1)


def heads_mean(per_channel: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H * head_dim,) -> (H,) mean over each head's channels."""
    return per_channel.reshape(-1, head_dim).mean(dim=1)


# ---- FLAP's standardization ------------------------------------------------------
def standardize(values: torch.Tensor) -> torch.Tensor:
    """(C,) -> (C,) (v - mean) / std, std with ddof=1 (torch's default, as FLAP); 0 where
    the std is 0 or undefined (one value)."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


def flap_standardized(per_channel: torch.Tensor, head_dim: int | None) -> torch.Tensor:
    """FLAP's standardized unit scores from one layer's per-channel scores.

    MLP (``head_dim`` None): (I,) -> (I,) standardized channel scores. Attention:
    (H * head_dim,) -> (H,) mean over each head's channels of the standardized squares.
    """
    if head_dim is None:
        return standardize(per_channel)
    return heads_mean(standardize(per_channel.square()), head_dim)


# ---- weight-only scores -------------------------------------------------------
def mlp_weight_scores(w_out: torch.Tensor, w_in: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(I,) ||W_out[:, u]|| * sqrt(||W_gate[u]|| * ||W_up[u]||), or ||W_out[:, u]|| * ||W_in[u]||.

    w_out (hidden, I); w_in one or two (I, hidden) matrices (geometric mean of their row norms).
    """
    out_norms = torch.linalg.vector_norm(w_out, dim=0)                         # (I,)
    in_norms = torch.stack([torch.linalg.vector_norm(w, dim=1) for w in w_in])  # (k, I)
    return out_norms * in_norms.prod(dim=0) ** (1.0 / len(w_in))


def head_weight_scores(w_o: torch.Tensor, w_q: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H,) ||W_o[:, head columns]||_F * ||W_q[head rows]||_F.

    w_o (hidden, H * head_dim), w_q (H * head_dim, hidden).
    """
    o_sq = heads_sum(w_o.square().sum(dim=0), head_dim)                        # (H,)
    q_sq = heads_sum(w_q.square().sum(dim=1), head_dim)                        # (H,)
    return torch.sqrt(o_sq) * torch.sqrt(q_sq)


# ---- ranks across sources -------------------------------------------------------
def scaled_rank(scores: np.ndarray) -> np.ndarray:
    """(U,) ranks in [0, 1] among the units, highest score -> 1, ties averaged."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 1:
        return np.ones(1)
    return (rankdata(scores, method="average") - 1.0) / (scores.size - 1)


def rank_matrix(scores: np.ndarray) -> np.ndarray:
    """(U, D) scores -> (U, D) per-source scaled ranks."""
    return np.stack([scaled_rank(scores[:, d]) for d in range(scores.shape[1])], axis=1)


def sensitivity(ranks: np.ndarray) -> np.ndarray:
    """(U, D) ranks -> (U,) population std over sources; NaN with a single source."""
    if ranks.shape[1] < 2:
        return np.full(ranks.shape[0], np.nan)
    return ranks.std(axis=1, ddof=0)


def normalized_scores(scores: np.ndarray) -> np.ndarray:
    """(U, D) scores -> (U, D) score / the layer's mean score on that source (0 where 0)."""
    layer_mean = scores.mean(axis=0, keepdims=True)                            # (1, D)
    return np.divide(scores, layer_mean, out=np.zeros_like(scores), where=layer_mean > 0)


def magnitude(scores: np.ndarray) -> np.ndarray:
    """(U, D) scores -> (U,) mean over sources of score / the layer's mean score."""
    return normalized_scores(scores).mean(axis=1)


def peak(scores: np.ndarray) -> np.ndarray:
    """(U, D) scores -> (U,) largest over sources of score / the layer's mean score."""
    return normalized_scores(scores).max(axis=1)
