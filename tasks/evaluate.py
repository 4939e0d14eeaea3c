"""Stage 7a, ``evaluate``: perplexity, multiple-choice accuracy, size, FLOPs and speed.

``model`` is a surgery artifact key (``surgery-…``: its ``model/`` folder is loaded)
or a dense model spec (``smollm2``, ``tiny:llama``, a folder). The artifact key
depends only on the checkpoint's identity (surgery key or dense fingerprint), the
corpus keys and the EvalConfig, so the dense model is evaluated once and reused by
every pruning run. Output: ``results.parquet`` (schema in ``gprune.eval.results``).

Order within one evaluation: perplexity, multiple choice, size, then (``speed=True``)
the speed probe, last so it does not time a cold model; a pruned checkpoint is timed
interleaved with its dense source model (loaded for the probe), which gives speedups
that a drift of the machine's load does not bias. The flow runs evaluations one at a
time. Progress bars only on a terminal (stderr a TTY); otherwise one log line per
measurement with its time.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.evaluate import EvalConfig
from gprune.errors import GpruneError
from gprune.eval.mc_tasks import is_file_task
from gprune.eval.results import record, results_frame
from gprune.maths import evaluate as em
from gprune.models.loader import load_model, resolve_device, resolve_model
from tasks.base import run_stage, stage_spec

log = logging.getLogger("gprune")


@dataclass(frozen=True)
class Checkpoint:
    identity: str                 # surgery key or dense fingerprint
    path: Path                    # HF folder
    extra: dict[str, Any] = field(default_factory=dict)
    source: tuple[str, str] | None = None  # a pruned model's dense (spec, fingerprint)


def resolve_checkpoint(store: ArtifactStore, model: str) -> Checkpoint:
    """A surgery artifact's model folder and run metadata, or a dense model."""
    if model.startswith("surgery-"):
        art = store.read(model, stage="surgery")
        extra = art.extra
        sparsity = extra.get("target_sparsity")
        return Checkpoint(model, art.path / "model", {
            "model": extra.get("source_spec") or extra.get("model") or art.manifest.get("model"),
            "method": extra.get("method", "unknown"),
            "target_sparsity": float(sparsity) if sparsity is not None else math.nan,
            "achieved_sparsity": extra.get("achieved_sparsity"),
            "calibration_sources": _calibration_sources(store, extra)},
            source=(extra["source_spec"], extra["source_fingerprint"])
            if extra.get("source_spec") and extra.get("source_fingerprint") else None)
    ref = resolve_model(model)
    return Checkpoint(ref.fingerprint, ref.path, {
        "model": model, "method": "dense", "target_sparsity": 0.0, "achieved_sparsity": 0.0,
        "calibration_sources": []})


def _calibration_sources(store: ArtifactStore, extra: dict[str, Any]) -> list[str]:
    """From the surgery manifest's extra, else from its plan artifact's extra, else none."""
    if "calibration_sources" in extra:
        return sorted(extra["calibration_sources"])
    plan_key = extra.get("plan_key")
    if plan_key and store.exists(plan_key):
        return sorted(store.read(plan_key).extra.get("calibration_sources", []))
    return []


def run_evaluate(config: EvalConfig, store: ArtifactStore, model: str,
                 corpus_keys: dict[str, str], force: bool = False) -> str:
    """Evaluate a checkpoint; return the ``evaluate`` artifact key."""
    checkpoint = resolve_checkpoint(store, model)
    inputs = {"model": checkpoint.identity, "corpora": dict(sorted(corpus_keys.items())),
              "task_files": _task_file_digests(config.mc_tasks)}
    spec = stage_spec(checkpoint.identity, inputs, config.params())

    def build(pending: PendingArtifact) -> None:
        frame, seq_len = evaluate_checkpoint(config, store, checkpoint, corpus_keys)
        frame.to_parquet(pending.file("results.parquet"), index=False)
        pending.extra.update({**checkpoint.extra, "seq_len_used": seq_len})

    return run_stage(store, "evaluate", spec, build, force=force)


def evaluate_checkpoint(config: EvalConfig, store: ArtifactStore, checkpoint: Checkpoint,
                        corpus_keys: dict[str, str]):
    """All result rows of one checkpoint, and the window length actually used."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model, tokenizer, adapter = load_model(checkpoint.path, device=device)
    calibration = checkpoint.extra["calibration_sources"]
    seq_len = _window_length(config.seq_len, model)
    start = time.perf_counter()
    rows = [*_ppl_rows(config, store, corpus_keys, model, tokenizer, seq_len, calibration),
            *_mc_rows(config, model, tokenizer, device),
            *_size_rows(model, adapter, seq_len)]
    if config.speed:
        rows += _speed_rows(config, model, seq_len, _dense_source(checkpoint, device))
    log.info("evaluate: %s (%s) done in %.1f s", checkpoint.extra.get("method"),
             checkpoint.identity, time.perf_counter() - start)
    return results_frame(rows), seq_len


def progress_bars() -> bool:
    """Bars on a terminal only; logs get one line per measurement instead."""
    return sys.stderr.isatty()


def _window_length(seq_len: int, model) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        log.warning("evaluate: seq_len %d exceeds the model's %d positions; using %d",
                    seq_len, limit, limit)
        return int(limit)
    return seq_len


def _ppl_rows(config, store, corpus_keys, model, tokenizer, seq_len, calibration) -> list[dict]:
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split

    rows = []
    n_windows = -(-config.ppl_tokens // seq_len)
    for source, key in sorted(corpus_keys.items()):
        texts = read_split(store, key, "heldout")
        ids, mask = sample_sequences(texts, tokenizer, n_windows, seq_len, config.seed)
        start = time.perf_counter()
        result = em.perplexity(model, ids, mask, config.batch_size, progress=progress_bars())
        log.info("evaluate: perplexity on %s (%d windows x %d tokens): %.2f in %.1f s", source,
                 *ids.shape, result.ppl, time.perf_counter() - start)
        rows.append(record("ppl", source, "ppl", result.ppl, result.stderr, result.tokens,
                           calibration_sources=calibration))
    return rows


def _mc_rows(config: EvalConfig, model, tokenizer, device: str) -> list[dict]:
    from gprune.eval.lm_eval_runner import run_mc_tasks

    results = run_mc_tasks(model, tokenizer, list(config.mc_tasks), config.mc_limit,
                           batch_size=config.mc_batch_size, device=device, seed=config.seed,
                           progress=progress_bars())
    return [record("mc", r.task, r.metric, r.value, r.stderr, r.examples, r.skipped)
            for r in results]


def _size_rows(model, adapter, seq_len: int) -> list[dict]:
    counts = em.parameter_counts(model, adapter)
    rows = [record("size", name, "bytes" if name == "bytes" else "count", value)
            for name, value in counts.items()]
    flops = em.flops_per_token(model, adapter, context=(seq_len + 1) / 2)
    return rows + [record("size", "flops_per_token", "flops", flops)]


def _speed_rows(config: EvalConfig, model, seq_len: int, dense=None) -> list[dict]:
    """Prefill/decode tokens/s of ``model``; with its ``dense`` source model, both are timed
    interleaved and the speedups over dense are added."""
    models = {"dense": dense, "model": model} if dense is not None else {"model": model}
    speeds = em.measure_speeds(models, seq_len, config.speed_decode_tokens,
                               config.speed_repeats, seed=config.seed)["model"]
    repeats = config.speed_repeats
    tokens = {"prefill_tokens_per_s": seq_len, "decode_tokens_per_s": config.speed_decode_tokens}
    rows = [record("speed", name, "tokens_per_s", *speeds[name], tokens[name] * repeats)
            for name in tokens]
    rows += [record("speed", name, "ratio", *speeds[name], repeats)
             for name in ("prefill_speedup", "decode_speedup") if name in speeds]
    log.info("evaluate: speed probe (prefill %d tokens, decode %d tokens, median of %d%s): "
             "%.0f and %.1f tokens/s%s", seq_len, config.speed_decode_tokens, repeats,
             ", interleaved with the dense model" if dense is not None else "",
             speeds["prefill_tokens_per_s"][0], speeds["decode_tokens_per_s"][0],
             f", {speeds['prefill_speedup'][0]:.2f}x and {speeds['decode_speedup'][0]:.2f}x "
             "dense" if dense is not None else "")
    return rows


def _dense_source(checkpoint: Checkpoint, device: str):
    """The dense model a pruned checkpoint was cut from (the speed reference), or None:
    for a dense model, or when its spec no longer resolves to the same weights."""
    if checkpoint.source is None:
        return None
    spec, fingerprint = checkpoint.source
    try:
        ref = resolve_model(spec)
    except GpruneError as err:
        log.warning("evaluate: no speedup over dense: source model %s: %s", spec, err)
        return None
    if ref.fingerprint != fingerprint:
        log.warning("evaluate: no speedup over dense: %s now resolves to other weights "
                    "(%s, the checkpoint was cut from %s)", spec, ref.fingerprint, fingerprint)
        return None
    model, _, _ = load_model(ref.path, device=device)
    return model


def _task_file_digests(tasks: tuple[str, ...]) -> dict[str, str]:
    """Content hashes of .jsonl task files, so an edited file gives a new key."""
    digests = {}
    for task in tasks:
        path = Path(task).expanduser()
        if is_file_task(task) and path.is_file():
            digests[task] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digests
