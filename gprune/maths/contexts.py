"""Token contexts for FANG (arXiv 2512.23014): a sample of each layer's MLP-input token
vectors, reduced by PCA and clustered into K context types.

``ContextCapture`` hooks, per decoder layer (found through the family adapter), the input of
the MLP block (the token representation the MLP reads, after the layer's norm) and the
input of the MLP output projection (the channel activations), and keeps the rows of a fixed
random sample of the pass's real tokens (``sample_rows``; the same rows in every layer).
From the MLP-input sample ``pca`` gives a mean and a (hidden, dim) basis, ``kmeans``
(k-means++ seeding, Lloyd iterations, a seeded torch generator: deterministic) K centroids
in the reduced space. ``context_weights`` turns a token's distances to the centroids into
FANG's token weights alpha = softmax(-distance / tau) over tokens, per context.

Memory: n_sample * (hidden + d_mlp) float32 per layer while sampling (``sample_bytes``).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from gprune.errors import ConfigError
from gprune.maths.hooked import HookedPass, feed_batches
from gprune.models.adapters import FamilyAdapter

MIN_TOKENS_PER_CONTEXT = 8   # K contexts need at least 8 * K sampled tokens


def check_sample(k: int, pca_dim: int, n_sample: int, available: int | None = None) -> None:
    """One-line error when K contexts or the PCA dimension do not fit the sample."""
    n = n_sample if available is None else min(n_sample, available)
    where = "sampled" if available is None else f"available ({available} calibration tokens)"
    if k * MIN_TOKENS_PER_CONTEXT > n:
        raise ConfigError(f"fang: k={k} contexts need at least {k * MIN_TOKENS_PER_CONTEXT} "
                          f"tokens, {n} are {where}; lower k or raise sample_tokens")
    if pca_dim >= n:
        raise ConfigError(f"fang: pca_dim={pca_dim} needs more than {pca_dim} tokens, {n} are "
                          f"{where}; lower pca_dim or raise sample_tokens")


def sample_rows(total: int, n_sample: int, seed: int) -> torch.Tensor:
    """(min(n_sample, total),) sorted indices into the pass's ``total`` real tokens."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:n_sample].sort().values


def mlp_blocks(model: nn.Module, adapter: FamilyAdapter) -> list[tuple[nn.Module, nn.Linear]]:
    """(MLP block, its output projection) per layer; one-line error when not hookable."""
    try:
        blocks = [(adapter.mlp_module(layer), adapter.mlp_output(layer))
                  for layer in adapter.decoder_layers(model)]
    except AttributeError as err:
        raise ConfigError(f"fang: the MLP input of family {adapter.name} cannot be hooked "
                          f"({err}); FANG needs an adapter with an MLP block") from None
    if not blocks or not all(isinstance(b, nn.Module) and isinstance(o, nn.Linear)
                             for b, o in blocks):
        raise ConfigError(f"fang: the MLP input of family {adapter.name} cannot be hooked "
                          "(no MLP block module with a linear output projection)")
    return blocks


class ContextCapture(HookedPass):
    """Keeps the sampled tokens' MLP inputs (n, hidden) and channel activations (n, d_mlp)."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, rows: torch.Tensor):
        super().__init__(model, next(model.parameters()).device)
        self.blocks = mlp_blocks(model, adapter)
        self.rows = rows                                            # (n,) global token indices
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.acts: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._picked: torch.Tensor | None = None                    # this batch's local rows
        self._real: torch.Tensor | None = None                      # the batch's real tokens

    def _register(self) -> None:
        for i, (block, out) in enumerate(self.blocks):
            self._track(block.register_forward_pre_hook(partial(self._keep, self.inputs[i])))
            self._track(out.register_forward_pre_hook(partial(self._keep, self.acts[i])))

    def _feed(self, rows):
        super()._feed(rows)
        self._real = rows                        # the batch's real tokens (None: all)
        start = self.tokens                      # real tokens before this batch
        first = int(torch.searchsorted(self.rows, torch.tensor(start)))
        self._picked = self.rows[first:] - start  # (m,); _keep drops those past the batch

    def _keep(self, store: list, module: nn.Module, args: tuple) -> None:
        if not self._feeding or self._picked is None or self._picked.numel() == 0:
            return
        flat = args[0].reshape(-1, args[0].shape[-1])               # (B*T, d)
        real = flat if self._real is None else flat.index_select(0, self._real.to(flat.device))
        picked = self._picked[self._picked < real.shape[0]]
        store.append(real.index_select(0, picked.to(real.device)).float().cpu())  # (m, d)

    def _end_batch(self) -> None:
        self._picked = None

    def first_non_finite(self):
        for i, acts in enumerate(self.acts):
            if acts and not bool(torch.isfinite(acts[-1]).all()):
                return i, "mlp"
        return None

    def samples(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP inputs (n, hidden), channel activations (n, d_mlp)) of one layer."""
        return torch.cat(self.inputs[layer]), torch.cat(self.acts[layer])


def sample_contexts(model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, rows: torch.Tensor, batch_size: int,
                    label: str = "", progress: bool = True) -> ContextCapture:
    """Run the calibration tokens; return the capture holding every layer's sample."""
    with ContextCapture(model, adapter, rows) as capture:
        feed_batches(capture, input_ids, attention_mask, batch_size,
                     f"contexts {label}".strip(), progress,
                     lambda layer, what: ConfigError(f"fang: NaN or inf in the MLP activations "
                                                     f"of layer {layer}{' of ' + label if label else ''}"))
    return capture


def sample_bytes(n: int, hidden: int, d_mlp: int, layers: int) -> int:
    return 4 * n * (hidden + d_mlp) * layers


def pca(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), basis (d, dim)) of x (n, d): the top right-singular vectors of the
    centred sample, each signed so that its largest-magnitude entry is positive."""
    x64 = x.double()
    mean = x64.mean(0)                                                # (d,)
    _, _, vh = torch.linalg.svd(x64 - mean, full_matrices=False)      # vh (min(n,d), d)
    basis = vh[:dim].T.clone()                                        # (d, dim)
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))  # (1, dim)
    return mean, basis * torch.where(sign == 0, 1.0, sign)


def kmeans(z: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """(k, dim) centroids of z (n, dim): k-means++ seeding, then Lloyd iterations; an empty
    cluster takes the point farthest from its centroid."""
    gen = torch.Generator().manual_seed(seed)
    z = z.double()
    centroids = z[torch.randint(len(z), (1,), generator=gen)]          # (1, dim)
    while len(centroids) < k:
        d2 = torch.cdist(z, centroids).min(1).values.square()          # (n,)
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=gen) if d2.sum() > 0 \
            else torch.randint(len(z), (1,), generator=gen)
        centroids = torch.cat([centroids, z[pick]])
    for _ in range(iters):
        dist = torch.cdist(z, centroids)                               # (n, k)
        labels = dist.argmin(1)
        new = torch.zeros_like(centroids).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=k)
        new = new / counts.clamp(min=1).unsqueeze(1).double()
        for empty in (counts == 0).nonzero().flatten().tolist():
            far = dist.gather(1, labels[:, None]).squeeze(1).argmax()
            new[empty] = z[far]
            labels[far] = empty
        if torch.allclose(new, centroids):
            break
        centroids = new
    return centroids


def context_distances(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, k) Euclidean distances of reduced tokens z (n, dim) to the centroids (k, dim),
    divided by their mean (scale-free, so tau does not depend on the model's width)."""
    dist = torch.cdist(z.double(), centroids.double())                 # (n, k)
    return dist / dist.mean().clamp(min=1e-12)


def context_weights(dist: torch.Tensor, tau: float) -> torch.Tensor:
    """(n, k) token weights alpha[:, j] = n * softmax_t(-dist[t, j] / tau) (mean 1 per
    context, as the reference scales its softmax over a sequence's tokens)."""
    if tau <= 0:
        raise ConfigError(f"fang: tau must be > 0, got {tau}")
    return torch.softmax(-dist / tau, dim=0) * dist.shape[0]
