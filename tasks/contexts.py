"""Stage ``contexts`` task (FANG, arXiv 2512.23014): (model, calibration corpora) -> each
layer's sampled MLP-input tokens, reduced and clustered into context types.

A companion of ``capture``: per source it samples the capture's calibration sequences
(same sampler and token check), runs them once through the dense model and keeps
``sample_tokens`` real tokens (split evenly over the sources; the same positions in every
layer), ``gprune.maths.contexts``. Files, one per decoder layer, ``layer_000.safetensors``,
...:

``z``         (n, pca_dim) float32   the sampled MLP inputs in the PCA basis
``acts``      (n, d_mlp) float16     their MLP channel activations (output-projection input;
                                     float32 when one exceeds float16's range)
``centroids`` (k, pca_dim) float32   the k-means context centroids
``mean`` (hidden,), ``basis`` (hidden, pca_dim) float32: the PCA
``w_out_sq``  (d_mlp,) float32       ||W_out[:, c]||^2 of the MLP output projection

Reader: ``tasks.contexts_files.read_contexts``. Manifest extra: sources, tokens (per source), sampled (per source), bytes (files),
memory_bytes (the float32 samples while the pass runs), pass_seconds, cluster_seconds,
model_path, family.
"""
from __future__ import annotations

import logging
import time

import torch
from safetensors.torch import save_file

from artifacts.store import ArtifactStore
from gprune.configs.capture import CaptureConfig
from gprune.configs.contexts import ContextsConfig
from gprune.errors import ConfigError
from gprune.maths.contexts import (check_sample, kmeans, mlp_blocks, pca, sample_bytes,
                                   sample_contexts, sample_rows)
from gprune.models.loader import load_model, resolve_device, resolve_model
from tasks.base import run_stage, stage_spec
from tasks.contexts_files import layer_file, read_contexts  # noqa: F401 (the reader)

log = logging.getLogger("gprune")
STAGE = "contexts"   # tasks.contexts_files.STAGE


def run_contexts(config: ContextsConfig, store: ArtifactStore, model: str,
                 corpus_keys: list[str], force: bool = False) -> str:
    """Sample, reduce and cluster every layer's MLP-input tokens; return the artifact key."""
    if len(corpus_keys) != len(config.sources):
        raise ConfigError(f"contexts: {len(config.sources)} sources but {len(corpus_keys)} "
                          "corpus keys; give one corpus per source")
    ref = resolve_model(model)
    spec = stage_spec(ref.fingerprint, {"corpora": list(corpus_keys)}, config.params())

    def build(out) -> None:
        device = resolve_device(config.device)
        dense, tokenizer, adapter = load_model(ref, device)
        blocks = mlp_blocks(dense, adapter)                  # unhookable family: error now
        batches = [_tokens(store, key, source, tokenizer, config)
                   for source, key in zip(config.sources, corpus_keys)]
        per_source = config.sample_tokens // len(batches)
        check_sample(config.k, config.pca_dim, config.sample_tokens,
                     sum(min(per_source, n) for _, _, n in batches))
        hidden, d_mlp = blocks[0][1].out_features, blocks[0][1].in_features
        if config.pca_dim > hidden:
            raise ConfigError(f"fang: pca_dim={config.pca_dim} exceeds the model's hidden "
                              f"size {hidden}; lower pca_dim")
        log.info("contexts: %d tokens x %d layers sampled: %.1f MB float32 while sampling",
                 config.sample_tokens, len(blocks),
                 sample_bytes(config.sample_tokens, hidden, d_mlp, len(blocks)) / 1e6)
        started = time.time()
        captures = [sample_contexts(dense, adapter, ids, mask,
                                    sample_rows(n, per_source, config.seed + i),
                                    config.batch_size, label=source)
                    for i, ((ids, mask, n), source) in enumerate(zip(batches, config.sources))]
        passed = time.time()
        for layer, (_, down) in enumerate(blocks):
            tensors = _cluster(captures, layer, down.weight, config)
            save_file(tensors, str(out.file(layer_file(layer))))
        files = sum(out.file(layer_file(i)).stat().st_size for i in range(len(blocks)))
        out.extra.update({
            "sources": list(config.sources), "tokens": [n for _, _, n in batches],
            "sampled": [int(c.rows.numel()) for c in captures], "bytes": files,
            "memory_bytes": sample_bytes(config.sample_tokens, hidden, d_mlp, len(blocks)),
            "pass_seconds": round(passed - started, 2),
            "cluster_seconds": round(time.time() - passed, 2),
            "model_path": str(ref.path), "family": ref.family, "layers": len(blocks)})
        log.info("contexts: %d layers, %.1f MB on disk, pass %.1fs, PCA + k-means %.1fs",
                 len(blocks), files / 1e6, passed - started, time.time() - passed)

    return run_stage(store, STAGE, spec, build, force)


def _tokens(store: ArtifactStore, corpus_key: str, source: str, tokenizer,
            config: ContextsConfig):
    """(input_ids, attention_mask, real tokens) of one source: the capture's sampler."""
    from gprune.data.corpus import sample_sequences
    from tasks.capture import check_token_count
    from tasks.corpus import read_split

    texts = read_split(store, corpus_key, "calibration")
    ids, mask = sample_sequences(texts, tokenizer, config.n_sequences, config.seq_len,
                                 config.seed)
    capture = CaptureConfig(source=source, n_sequences=config.n_sequences,
                            seq_len=config.seq_len, seed=config.seed)
    return ids, mask, check_token_count(int(mask.sum()), capture)


def _cluster(captures, layer: int, w_out: torch.Tensor,
             config: ContextsConfig) -> dict[str, torch.Tensor]:
    """One layer's stored tensors from the sources' samples."""
    inputs = torch.cat([c.samples(layer)[0] for c in captures])            # (n, hidden)
    acts = torch.cat([c.samples(layer)[1] for c in captures])              # (n, d_mlp)
    mean, basis = pca(inputs, config.pca_dim)                              # (h,), (h, dim)
    z = (inputs.double() - mean) @ basis                                   # (n, dim)
    centroids = kmeans(z, config.k, config.seed, config.kmeans_iters)      # (k, dim)
    small = float(acts.abs().max()) < 6e4         # float16 keeps it finite, else float32
    return {"z": z.float().contiguous(),
            "acts": (acts.half() if small else acts).contiguous(),
            "centroids": centroids.float().contiguous(), "mean": mean.float().contiguous(),
            "basis": basis.float().contiguous(),
            "w_out_sq": w_out.detach().float().square().sum(0).cpu().contiguous()}

