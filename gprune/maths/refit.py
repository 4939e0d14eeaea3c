"""Weight reconstruction of an output projection after its input channels were pruned.

The output projection ``y = W x + b`` (W: (out, d)) keeps the input channels ``K``.
Without reconstruction the removed channels' contribution is simply lost. Two ways to
recover it from calibration statistics:

- ``bias`` (FLAP, arXiv 2312.11983): ``b' = b + W[:, R] mean(x_R)`` (R: removed);
- ``lsq`` (least squares, as GRAIL arXiv 2602.23795 and SlimGPT refit the kept weights):
  the kept columns and the bias are refit so that ``W' x_K + b'`` reproduces the dense
  output on the calibration inputs. With the Gram ``G = E[x~ x~^T]`` of ``x~ = [x, 1]``
  ((d+1, d+1), the last row/column the means, the corner 1), ``S = K + [intercept]`` and
  the dense map ``A = [W, b]`` (out, d+1), the ridge-damped normal equations are

      (G[S, S] + lam * D) B^T = G[S, :] A^T,   lam = ridge * mean(diag G[K, K]),

  D the identity on K and 0 on the intercept (the bias is not shrunk); ``W' = B[:, :k]``,
  ``b' = B[:, k]``. The residual ``E||A x~ - B x~_S||^2`` per token is returned too (the
  error the pruning leaves after the refit), with a condition estimate of the damped
  kept Gram (from its Cholesky factor; a singular kept Gram is what the ridge is for).

Pure tensor maths in float64; shapes in the comments.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Refit:
    weight: torch.Tensor      # (out, k)
    bias: torch.Tensor        # (out,)
    residual: float           # mean squared output error per token after the refit
    condition: float          # condition estimate of the damped kept Gram (Cholesky)
    per_output: torch.Tensor  # (out,) the residual of each output dimension


def dense_map(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W, b]`` in float64: (out, d+1); a missing bias is zero."""
    w = weight.detach().to(torch.float64)                                 # (out, d)
    b = (torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None
         else bias.detach().to(device=w.device, dtype=torch.float64))     # (out,)
    return torch.cat([w, b[:, None]], dim=1)                              # (out, d+1)


def normalized(gram: torch.Tensor) -> torch.Tensor:
    """A Gram of sums (corner = token count) as second moments (corner = 1)."""
    count = gram[-1, -1]
    if not torch.isfinite(gram).all() or count <= 0:
        raise ValueError("the Gram has non-finite entries or no tokens")
    return gram.to(torch.float64) / count


@dataclass(frozen=True)
class DenseProducts:
    """What a projection's refits share whatever the kept set: G A^T and diag(A G A^T)."""
    cross: torch.Tensor       # (d+1, out) G A^T: its rows S are the normal equations' rhs
    energy: torch.Tensor      # (out,) each dense output's mean square (``dense_energy``)


def dense_products(a: torch.Tensor, g: torch.Tensor) -> DenseProducts:
    """``DenseProducts`` of A (out, d+1) and a normalized Gram G (d+1, d+1)."""
    cross = g @ a.T                                                       # (d+1, out)
    return DenseProducts(cross, (a * cross.T).sum(1))                     # diag(A G A^T)


def lsq_refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor,
              keep: torch.Tensor, ridge: float, condition: bool = True,
              residual: bool = True, products: DenseProducts | None = None) -> Refit:
    """Refit the kept columns ``keep`` (k,) and the bias; ``gram`` (d+1, d+1) normalized.
    ``condition``: also compute the damped kept Gram's condition number (else NaN);
    ``residual``: also the residual (else NaN, and ``per_output`` NaN: it costs one more
    (out, d) x (d, d) product, as much as the solve's right-hand side). ``products``: this
    projection's ``dense_products`` with this Gram, which give the right-hand side and the
    residual's dense term without a (k, d) x (d, out) product."""
    a = dense_map(weight, bias)                                           # (out, d+1)
    g = gram.to(device=a.device, dtype=torch.float64)                     # (d+1, d+1)
    d = a.shape[1] - 1
    s = torch.cat([keep.to(device=a.device, dtype=torch.long),
                   torch.tensor([d], device=a.device)])                   # (k+1,)
    g_ss = g[s[:, None], s]                                               # (k+1, k+1)
    k = s.numel() - 1
    lam = ridge * g_ss.diagonal()[:k].mean().clamp_min(1e-30) if k else g_ss.new_tensor(0.0)
    damp = torch.zeros(k + 1, dtype=torch.float64, device=a.device)
    damp[:k] = lam
    lhs = g_ss + torch.diag(damp)                                         # (k+1, k+1)
    rhs = (g[s] @ a.T if products is None
           else products.cross[s].to(a.device))                          # (k+1, out)
    factor, info = torch.linalg.cholesky_ex(lhs)                         # SPD when damped
    skipped = torch.full((a.shape[0],), float("nan"), dtype=torch.float64, device=a.device)
    if int(info) == 0:
        b_t = torch.cholesky_solve(rhs, factor)                           # (k+1, out)
        energy = None if products is None else products.energy
        per_output = solved_residual(a, g, b_t, rhs, damp, energy) if residual else skipped
        estimate = cholesky_condition(factor)
    else:
        b_t = torch.linalg.lstsq(lhs, rhs).solution                       # (k+1, out)
        per_output = residual_per_output(a, g, b_t.T, s) if residual else skipped
        estimate = float("inf")
    return Refit(b_t[:k].T.contiguous(), b_t[k].contiguous(), float(per_output.sum()),
                 estimate if condition else float("nan"), per_output)


def dense_energy(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(out,) diag(A G A^T): each dense output's mean square; A (out, d+1), G (d+1, d+1)."""
    return (a @ g * a).sum(1)


def solved_residual(a: torch.Tensor, g: torch.Tensor, b_t: torch.Tensor, rhs: torch.Tensor,
                    damp: torch.Tensor, energy: torch.Tensor | None = None) -> torch.Tensor:
    """(out,) ``residual_per_output`` of a solution of (G_SS + D) b_t = rhs = G_S: A^T.

    Then G_SS b_t = rhs - D b_t, so diag(B G_S: A^T) = colsum(b_t * rhs) and
    diag(B G_SS B^T) = colsum(b_t * rhs) - colsum(D b_t^2): only the dense term
    diag(A G A^T) (``energy`` when given) needs a (out, d) x (d, d) product."""
    full = dense_energy(a, g) if energy is None else energy.to(a)         # (out,)
    cross = (b_t * rhs).sum(0)                                            # (out,)
    damped = (damp[:, None] * b_t * b_t).sum(0)                           # (out,)
    return (full - cross - damped).clamp_min(0.0)


def cholesky_condition(factor: torch.Tensor) -> float:
    """Cheap condition estimate of ``L L^T`` from its Cholesky factor: (max/min diag L)^2,
    a lower bound of the true condition number (no eigendecomposition needed)."""
    diag = factor.diagonal().abs()
    return float((diag.max() / diag.min().clamp_min(1e-300)) ** 2)


def residual_error(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> float:
    """``E||A x~ - B x~_S||^2`` per token from the Gram: A (out, d+1), B (out, |S|)."""
    return float(residual_per_output(a, g, b, s).sum())


def residual_per_output(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor,
                        s: torch.Tensor) -> torch.Tensor:
    """(out,) mean squared error of each output dimension, from the Gram."""
    full = dense_energy(a, g)                                             # diag(A G A^T)
    cross = (b @ g[s] * a).sum(1)                                         # diag(B G_S: A^T)
    kept = (b @ g[s][:, s] * b).sum(1)                                    # diag(B G_SS B^T)
    return (full - 2 * cross + kept).clamp_min(0.0)


def bias_refit(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP bias compensation: (W[:, keep] (out, k), b + W[:, removed] @ mean[removed])."""
    a = dense_map(weight, bias)                                           # (out, d+1)
    d = a.shape[1] - 1
    removed = torch.ones(d, dtype=torch.bool, device=a.device)
    removed[keep.to(a.device)] = False
    m = mean.to(device=a.device, dtype=torch.float64)                     # (d,)
    return a[:, keep.to(a.device)], a[:, d] + a[:, :d][:, removed] @ m[removed]
