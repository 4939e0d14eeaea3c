"""Stage ``speed``: prefill and decode tokens/s of a checkpoint at batch 1.

``model``: a surgery key or a dense model spec (``tasks.checkpoint``). The key depends
on the checkpoint's identity and the ``SpeedConfig``. Writes ``results.parquet``
(schema in ``gprune.eval.results``): ``prefill_tokens_per_s`` and
``decode_tokens_per_s`` (median of the repeats, after an untimed warm-up); for a pruned
checkpoint its dense source model is loaded too and the two are timed interleaved (runs
alternate, order rotating), which adds ``prefill_speedup`` and ``decode_speedup``
(pruned / dense, median over paired repeats) that a drift of the machine's load does not
bias. No speedup rows, with a warning, when the source spec no longer resolves to the
weights the checkpoint was cut from. The manifest's extra holds the run metadata and
``prefill_tokens_used`` (cut to the model's context). Run it alone on the machine: the
flow runs evaluations one at a time.
"""
from __future__ import annotations

import logging

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.speed import SpeedConfig
from gprune.errors import GpruneError
from gprune.eval.results import record
from gprune.maths import evaluate as em
from gprune.models.loader import load_model, resolve_model
from tasks.base import run_stage, stage_spec
from tasks.checkpoint import (Checkpoint, load_checkpoint, resolve_checkpoint, window_length,
                              write_results)

log = logging.getLogger("gprune")
STAGE = "speed"


def run_speed(config: SpeedConfig, store: ArtifactStore, model: str,
              force: bool = False) -> str:
    """Time a checkpoint (with its dense source when pruned); return the artifact key."""
    checkpoint = resolve_checkpoint(store, model)
    spec = stage_spec(checkpoint.identity, {"model": checkpoint.identity}, config.params())

    def build(pending: PendingArtifact) -> None:
        net, _, _, device = load_checkpoint(config, checkpoint)
        prompt = window_length(STAGE, config.prefill_tokens, net)
        rows = speed_rows(config, net, prompt, dense_source(checkpoint, device))
        write_results(pending, rows, checkpoint, prefill_tokens_used=prompt)

    return run_stage(store, STAGE, spec, build, force=force)


def speed_rows(config: SpeedConfig, model, prompt: int, dense=None) -> list[dict]:
    """Prefill/decode tokens/s of ``model``; with its ``dense`` source model, both are timed
    interleaved and the speedups over dense are added."""
    models = {"dense": dense, "model": model} if dense is not None else {"model": model}
    speeds = em.measure_speeds(models, prompt, config.decode_tokens, config.repeats,
                               seed=config.seed)["model"]
    tokens = {"prefill_tokens_per_s": prompt, "decode_tokens_per_s": config.decode_tokens}
    rows = [record("speed", name, "tokens_per_s", *speeds[name], tokens[name] * config.repeats)
            for name in tokens]
    rows += [record("speed", name, "ratio", *speeds[name], config.repeats)
             for name in ("prefill_speedup", "decode_speedup") if name in speeds]
    log.info("speed: prefill %d tokens, decode %d tokens, median of %d%s: %.0f and %.1f "
             "tokens/s%s", prompt, config.decode_tokens, config.repeats,
             ", interleaved with the dense model" if dense is not None else "",
             speeds["prefill_tokens_per_s"][0], speeds["decode_tokens_per_s"][0],
             f", {speeds['prefill_speedup'][0]:.2f}x and {speeds['decode_speedup'][0]:.2f}x "
             "dense" if dense is not None else "")
    return rows


def dense_source(checkpoint: Checkpoint, device: str):
    """The dense model a pruned checkpoint was cut from (the speed reference), or None:
    for a dense model, or when its spec no longer resolves to the same weights."""
    if checkpoint.source is None:
        return None
    spec, fingerprint = checkpoint.source
    try:
        ref = resolve_model(spec)
    except GpruneError as err:
        log.warning("speed: no speedup over dense: source model %s: %s", spec, err)
        return None
    if ref.fingerprint != fingerprint:
        log.warning("speed: no speedup over dense: %s now resolves to other weights "
                    "(%s, the checkpoint was cut from %s)", spec, ref.fingerprint, fingerprint)
        return None
    model, _, _ = load_model(ref.path, device=device)
    return model
