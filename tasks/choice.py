"""Stage ``choice``: multiple-choice accuracy of a checkpoint, per task.

``model``: a surgery key or a dense model spec (``tasks.checkpoint``). The key depends
on the checkpoint's identity, the ``ChoiceConfig`` and the content of every ``.jsonl``
task file (an edited file is a new key). Writes ``results.parquet`` (schema in
``gprune.eval.results``): one ``mc`` row per task (metric ``acc`` or ``acc_norm``, its
standard error, examples scored and malformed rows skipped), always tagged ``ood``; the
manifest's extra holds the run metadata. Scored by lm-eval through
``gprune.eval.lm_eval_runner.run_mc_tasks`` (shared-context loglikelihoods).
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.choice import ChoiceConfig
from gprune.eval.mc_tasks import is_file_task
from gprune.eval.results import record
from tasks.base import run_stage, stage_spec
from tasks.checkpoint import load_checkpoint, progress_bars, resolve_checkpoint, write_results

log = logging.getLogger("gprune")
STAGE = "choice"


def run_choice(config: ChoiceConfig, store: ArtifactStore, model: str,
               force: bool = False) -> str:
    """Score a checkpoint on the multiple-choice tasks; return the artifact key."""
    checkpoint = resolve_checkpoint(store, model)
    inputs = {"model": checkpoint.identity, "task_files": task_file_digests(config.mc_tasks)}
    spec = stage_spec(checkpoint.identity, inputs, config.params())

    def build(pending: PendingArtifact) -> None:
        start = time.perf_counter()
        net, tokenizer, _, device = load_checkpoint(config, checkpoint)
        write_results(pending, mc_rows(config, net, tokenizer, device), checkpoint)
        log.info("choice: %s (%s) done in %.1f s", checkpoint.extra["method"],
                 checkpoint.identity, time.perf_counter() - start)

    return run_stage(store, STAGE, spec, build, force=force)


def mc_rows(config: ChoiceConfig, model, tokenizer, device: str) -> list[dict]:
    """One ``mc`` row per task: lm-eval's metric on the first ``mc_limit`` examples."""
    from gprune.eval.lm_eval_runner import run_mc_tasks

    results = run_mc_tasks(model, tokenizer, list(config.mc_tasks), config.mc_limit,
                           batch_size=config.mc_batch_size, device=device, seed=config.seed,
                           progress=progress_bars())
    return [record("mc", r.task, r.metric, r.value, r.stderr, r.examples, r.skipped)
            for r in results]


def task_file_digests(tasks: tuple[str, ...]) -> dict[str, str]:
    """Content hashes of .jsonl task files, so an edited file gives a new key."""
    digests = {}
    for task in tasks:
        path = Path(task).expanduser()
        if is_file_task(task) and path.is_file():
            digests[task] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return digests
