"""Stage 5 task: scores (+ the model for the learned allocator) -> a pruning plan artifact.

This is the only stage that depends on the target sparsity: one capture, stats,
partition and score serve every target.
"""
from __future__ import annotations

import logging
import time

import pandas as pd
import torch

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.allocate import AllocateConfig
from gprune.errors import ArtifactError
from gprune.maths.allocate import flap_fractions, harden, project, uniform_fractions
from gprune.maths.budget import check_target
from gprune.maths.learned import LearnSettings, learn_fractions
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.models.adapters import ModelShape
from tasks.base import run_stage, stage_spec

log = logging.getLogger("gprune")
TOLERANCE = 0.005  # achieved sparsity within 0.5 percentage points of the target


def stats_shape(stats: Artifact) -> ModelShape:
    return ModelShape(**stats.extra["shape"])


def run_allocate(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
                 method: str = "gprune", bias_compensation: bool = False,
                 force: bool = False) -> str:
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    check_target(shape, config.sparsity, config.mlp_floor, config.prune_attention)
    params = {**config.key_params(), "method": method, "bias_compensation": bias_compensation}
    spec = stage_spec(stats.manifest["model"], {"score": score_key, "stats": stats_key}, params)

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        started = time.time()
        fractions, history = _fractions(config, store, stats, scores, shape)
        alloc = project(fractions, shape, config.sparsity, config.mlp_floor, config.prune_attention)
        layers = tuple(LayerPlan(l["layer"], tuple(l["mlp_keep"]), tuple(l["heads_keep"]),
                                 tuple(l["kv_keep"])) for l in harden(scores, alloc, shape))
        plan = PruningPlan(
            model_fingerprint=stats.manifest["model"], family=stats.extra["family"],
            method=method, target_sparsity=config.sparsity, dense=shape, layers=layers,
            bias_compensation=bias_compensation,
            extra={"allocator": config.allocator, "calibration_sources": stats.extra["sources"],
                   "stats_key": stats_key, "score_key": score_key})
        _check_budget(plan)
        plan.write(out.path)
        _module_table(fractions, alloc, shape).to_parquet(out.file("modules.parquet"), index=False)
        seconds = round(time.time() - started, 2)
        log.info("allocate %s at %.2f: achieved %.4f in %.1fs", method, config.sparsity,
                 plan.achieved_sparsity, seconds)
        out.extra.update({"achieved_sparsity": plan.achieved_sparsity, "method": method,
                          "allocator_seconds": seconds, "objective": history,
                          "model_path": stats.extra["model_path"],
                          "calibration_sources": stats.extra["sources"]})

    return run_stage(store, "plan", spec, build, force)


def _fractions(config, store, stats, scores, shape):
    if config.allocator == "uniform":
        return uniform_fractions(scores, shape, config.sparsity, config.prune_attention), []
    if config.allocator == "flap":
        return flap_fractions(scores, shape, config.sparsity, config.prune_attention), []
    from gprune.models.loader import load_model, resolve_device

    device = resolve_device(config.device)
    model, tokenizer, adapter = load_model(stats.extra["model_path"], device=device)
    torch.manual_seed(config.seed)
    batches = calibration_batches(store, stats, tokenizer, config)
    settings = LearnSettings(steps=config.steps, lr=config.lr, penalty=config.penalty,
                             t_start=config.t_start, t_end=config.t_end,
                             prune_attention=config.prune_attention)
    return learn_fractions(model, adapter, shape, scores, batches, config.sparsity, settings)


def calibration_batches(store: ArtifactStore, stats: Artifact, tokenizer,
                        config: AllocateConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mixed-source calibration tokens: equal shares of every source behind the stats."""
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split

    ids, masks = [], []
    corpus_keys = [store.read(k, stage="capture").manifest["inputs"]["corpus"]
                   for k in stats.extra["capture_keys"]]
    per_source = max(1, config.n_sequences // len(corpus_keys))
    for i, corpus_key in enumerate(corpus_keys):
        texts = read_split(store, corpus_key, "calibration")
        source_ids, source_mask = sample_sequences(texts, tokenizer, per_source, config.seq_len,
                                                   seed=config.seed + 1000 + i)
        ids.append(source_ids)
        masks.append(source_mask)
    ids_all, mask_all = _pad_cat(ids, tokenizer.pad_token_id), _pad_cat(masks, 0)
    order = torch.randperm(len(ids_all), generator=torch.Generator().manual_seed(config.seed))
    ids_all, mask_all = ids_all[order], mask_all[order]
    return [(ids_all[i:i + config.batch_size], mask_all[i:i + config.batch_size])
            for i in range(0, len(ids_all), config.batch_size)]


def _pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                      for t in tensors])


def _check_budget(plan: PruningPlan) -> None:
    if abs(plan.achieved_sparsity - plan.target_sparsity) > TOLERANCE:
        raise ArtifactError(f"allocation missed the budget: achieved {plan.achieved_sparsity:.4f} "
                            f"for target {plan.target_sparsity:.4f}; this is a bug, please report it")


def _module_table(fractions, alloc, shape: ModelShape) -> pd.DataFrame:
    rows = [{"layer": l, "kind": "mlp", "module": m, "size": n, "keep_fraction": fractions.mlp[(l, m)],
             "kept": alloc.mlp_counts[(l, m)]} for (l, m), n in fractions.mlp_sizes.items()]
    rows += [{"layer": l, "kind": "attn", "module": 0, "size": shape.heads, "keep_fraction": f,
              "kept": g * r} for l, f in fractions.attn.items()
             for g, r in [alloc.head_configs[l]]]
    return pd.DataFrame(rows)
