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
from gprune.maths.learned_path import PathSettings, learn_path, path_fractions
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.models.adapters import ModelShape
from tasks.base import run_stage, stage_spec

log = logging.getLogger("gprune")
TOLERANCE = 0.005  # achieved sparsity within 0.5 percentage points of the target


def stats_shape(stats: Artifact) -> ModelShape:
    return ModelShape(**stats.extra["shape"])


def run_allocate(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
                 method: str = "gprune", bias_compensation: bool = False,
                 force: bool = False, path_key: str | None = None) -> str:
    """The plan of one target. ``path_key``: the learned path to read (learned_path
    allocator); when None it is learned here, or reused when stored."""
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    check_target(shape, config.sparsity, config.mlp_floor, config.prune_attention)
    params = {**config.key_params(), "method": method, "bias_compensation": bias_compensation}
    inputs = {"score": score_key, "stats": stats_key}
    if config.allocator == "learned_path":
        inputs["path"] = path_key or run_path(config, store, score_key, stats_key)
    spec = stage_spec(stats.manifest["model"], inputs, params)

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        started = time.time()
        fractions, history = _fractions(config, store, stats, scores, shape, inputs.get("path"))
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


def run_path(config: AllocateConfig, store: ArtifactStore, score_key: str, stats_key: str,
             force: bool = False) -> str:
    """The learned path (gprune.maths.learned_path) of these scores: one artifact that
    every target sparsity's plan reads, learned once."""
    stats = store.read(stats_key, stage="stats")
    score = store.read(score_key, stage="score")
    shape = stats_shape(stats)
    spec = stage_spec(stats.manifest["model"], {"score": score_key, "stats": stats_key},
                      config.path_params())

    def build(out):
        scores = pd.read_parquet(score.file("scores.parquet"))
        started = time.time()
        model, adapter, batches = _learning_inputs(config, store, stats)
        settings = PathSettings(grid=config.path_grid, **_learn_settings(config))
        table, history = learn_path(model, adapter, shape, scores, batches, settings)
        table.to_parquet(out.file("path.parquet"), index=False)
        seconds = round(time.time() - started, 2)
        log.info("path: learned over targets %s in %.1fs", list(config.path_grid), seconds)
        out.extra.update({"path_seconds": seconds, "objective": history,
                          "grid": list(config.path_grid)})

    return run_stage(store, "path", spec, build, force)


def _fractions(config, store, stats, scores, shape, path_key=None):
    if config.allocator == "uniform":
        return uniform_fractions(scores, shape, config.sparsity, config.prune_attention), []
    if config.allocator == "flap":
        return flap_fractions(scores, shape, config.sparsity, config.prune_attention), []
    if config.allocator == "learned_path":
        _check_grid(config)
        table = pd.read_parquet(store.read(path_key, stage="path").file("path.parquet"))
        return path_fractions(table, scores, shape, config.sparsity, config.prune_attention), []
    model, adapter, batches = _learning_inputs(config, store, stats)
    settings = LearnSettings(**_learn_settings(config))
    return learn_fractions(model, adapter, shape, scores, batches, config.sparsity, settings)


def _learn_settings(config: AllocateConfig) -> dict:
    return dict(steps=config.learn_steps, lr=config.lr, penalty=config.penalty,
                t_start=config.t_start, t_end=config.t_end, prune_attention=config.prune_attention)


def _learning_inputs(config: AllocateConfig, store: ArtifactStore, stats: Artifact):
    from gprune.models.loader import load_model, resolve_device

    model, tokenizer, adapter = load_model(stats.extra["model_path"],
                                           device=resolve_device(config.device))
    torch.manual_seed(config.seed)
    return model, adapter, calibration_batches(store, stats, tokenizer, config)


def _check_grid(config: AllocateConfig) -> None:
    low, high = min(config.path_grid), max(config.path_grid)
    if not low - 0.05 <= config.sparsity <= high + 0.05:
        log.warning("allocate: target %.2f lies outside the learned path's grid [%.2f, %.2f]; "
                    "the path is extrapolated (widen path_grid to cover it)",
                    config.sparsity, low, high)


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
