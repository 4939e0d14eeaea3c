"""The ``gprune`` Prefect flow: every stage, chained as tasks that exchange artifact keys.

    corpus (mapped) -> capture (mapped over sources) -> stats -> partition -> score
      -> for each method: path (learned once)
      -> for each method and target sparsity: allocate -> surgery
      -> evaluate (the dense model, then each checkpoint, one at a time) -> report -> publish

Parameters are ``gprune.configs.pipeline.PipelineConfig``'s fields plus ``store`` (the
artifact store root; None = $GPRUNE_STORE or ~/.cache/gprune/store), so a caller runs
``gprune_flow(**PipelineConfig(...).model_dump(), store=...)`` (or ``run_pipeline``). ``preflight`` runs
before any task: bad input fails in seconds with a one-line error. Methods that share
a partition or score config share the task (and the artifact); one capture, stats,
partition and score serve every target. ``force`` names stages to recompute.

Orchestration only: the maths is in ``gprune``, each stage in ``tasks/``.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from prefect import allow_failure, flow, unmapped
from prefect.logging import get_run_logger

from artifacts.store import ArtifactStore
from flows import stages
from flows.cache import source_stamp
from flows.runners import make_task_runner
from gprune.configs.methods import MethodConfig
from gprune.configs.pipeline import PipelineConfig, preflight
from gprune.configs.report import ReportConfig
from gprune.configs.stats import StatsConfig

_D = PipelineConfig()


@flow(name="gprune", task_runner=make_task_runner(), validate_parameters=True,
      log_prints=True)
def gprune_flow(
    model: str = _D.model,
    sources: list[str] = _D.sources,
    eval_sources: list[str] = _D.eval_sources,
    sparsities: list[float] = _D.sparsities,
    methods: list[Union[str, dict[str, Any]]] = [m.name for m in _D.methods],  # noqa: B006
    capture_sequences: int = _D.capture_sequences,
    capture_seq_len: int = _D.capture_seq_len,
    capture_batch_size: int = _D.capture_batch_size,
    allocator_steps: Optional[int] = _D.allocator_steps,
    prune_attention: bool = _D.prune_attention,
    evaluate: bool = _D.evaluate,
    eval_tokens: int = _D.eval_tokens,
    eval_seq_len: int = _D.eval_seq_len,
    mc_tasks: list[str] = _D.mc_tasks,
    mc_limit: int = _D.mc_limit,
    speed: bool = _D.speed,
    device: str = _D.device,
    seed: int = _D.seed,
    force: list[str] = _D.force,
    store: Optional[str] = None,
) -> dict[str, Any]:
    """Prune ``model`` to every sparsity with every method; evaluate and report."""
    params = {k: v for k, v in locals().items() if k != "store"}
    config = PipelineConfig.build(**params)
    ref, _shape = preflight(config)
    root = str(ArtifactStore(store).root)
    logger = get_run_logger()
    logger.info("gprune: %s (%s), %d method(s) x %d target(s), store %s", config.model,
                ref.family, len(config.methods), len(config.sparsities), root)

    corpora = _corpora(config, root)
    capture_keys = stages.capture.map(
        [config.capture_config(s) for s in config.sources], unmapped(root),
        unmapped(config.model), unmapped(ref.fingerprint), [corpora[s] for s in config.sources],
        force=unmapped(config.forced("capture")))
    stats_key = stages.stats.submit(StatsConfig(), root, capture_keys,
                                    force=config.forced("stats"))
    plans, checkpoints = _targets(config, root, stats_key)
    result = {"store": root, "stats": stats_key.result(),
              "plans": {name: f.result() for name, f in plans.items()},
              "checkpoints": {name: f.result() for name, f in checkpoints.items()}}
    if config.evaluate:
        result.update(_evaluate_and_report(config, root, ref.fingerprint, corpora, checkpoints))
        logger.info("gprune: report at %s", result["report_dir"])
    else:
        logger.info("gprune: %d checkpoint(s) in %s (evaluation off)", len(checkpoints), root)
    return result


def _corpora(config: PipelineConfig, root: str) -> dict:
    """One corpus task per distinct calibration or evaluation source: source -> future."""
    names = list(dict.fromkeys([*config.sources, *(config.eval_sources if config.evaluate
                                                   else [])]))
    futures = stages.corpus.map([config.corpus_config(s) for s in names], unmapped(root),
                                [source_stamp(s) for s in names],
                                force=unmapped(config.forced("corpus")))
    return dict(zip(names, futures))


def _targets(config: PipelineConfig, root: str, stats_key) -> tuple[dict, dict]:
    """Partition and score once per distinct config, learn a path once per method that
    uses one, then allocate + surgery per target.

    Submitted stage by stage (every allocate before any surgery): a task waiting on its
    upstream holds a runner slot, so this order keeps the slots on runnable work."""
    scored: dict[str, Any] = {}
    plans, methods = {}, {}
    for method in config.methods:
        score_key = _score(config, root, stats_key, method, scored)
        path_key = _path(config, root, stats_key, score_key, method)
        for sparsity in config.sparsities:
            name = f"{method.label}@{sparsity:g}"
            methods[name] = method
            plans[name] = stages.allocate.submit(
                config.allocate_config(method, sparsity), root, score_key, stats_key,
                method.label, method.settings()["bias_compensation"],
                force=config.forced("plan"), path_key=path_key)
    checkpoints = {name: stages.surgery.submit(config.surgery_config(methods[name]), root, plan,
                                               stats_key, force=config.forced("surgery"))
                   for name, plan in plans.items()}
    return plans, checkpoints


def _path(config: PipelineConfig, root: str, stats_key, score_key, method: MethodConfig):
    """The learned path of a method whose allocator has one (None otherwise)."""
    # the path does not depend on the target: a fixed placeholder keeps the task's Prefect
    # cache key independent of the run's sparsities
    allocate_config = config.allocate_config(method, 0.5)
    if allocate_config.allocator != "learned_path":
        return None
    return stages.path.submit(allocate_config, root, score_key, stats_key, method.label,
                              force=config.forced("path"))


def _score(config: PipelineConfig, root: str, stats_key, method: MethodConfig,
           scored: dict) -> Any:
    part_cfg, score_cfg = method.partition_config(), method.score_config()
    part_id = part_cfg.model_dump_json()
    score_id = part_id + score_cfg.model_dump_json()
    if part_id not in scored:
        scored[part_id] = stages.partition.submit(part_cfg, root, stats_key,
                                                  force=config.forced("partition"))
    if score_id not in scored:
        scored[score_id] = stages.score.submit(score_cfg, root, stats_key, scored[part_id],
                                               force=config.forced("score"))
    return scored[score_id]


def _evaluate_and_report(config: PipelineConfig, root: str, fingerprint: str, corpora: dict,
                         checkpoints: dict) -> dict[str, Any]:
    """Evaluate the dense model and every checkpoint, one after another; report; publish.

    One at a time on purpose: each evaluation uses every CPU thread (two at once
    oversubscribe the cores and took about twice as long in total), a speed probe
    (``speed=True``) does not share the machine with another evaluation, and progress
    output does not interleave. A failed evaluation does not stop the next
    (``allow_failure``); the report then fails."""
    eval_corpora = {s: corpora[s] for s in config.eval_sources}
    names = ["dense", *checkpoints]
    models = [config.model, *checkpoints.values()]  # surgery futures resolve in the task
    identities = [fingerprint, *checkpoints.values()]
    eval_config = config.eval_config()
    evals: list = []
    for model, identity in zip(models, identities):
        evals.append(stages.evaluate.submit(
            eval_config, root, model, identity, eval_corpora,
            force=config.forced("evaluate"),
            wait_for=[allow_failure(evals[-1])] if evals else None))
    report_key = stages.report.submit(ReportConfig(), root, evals,
                                      force=config.forced("report")).result()
    report_dir = str(ArtifactStore(root).path(report_key))
    stages.publish.submit(report_dir).result()
    return {"evals": dict(zip(names, (f.result() for f in evals))), "report": report_key,
            "report_dir": report_dir}


def run_pipeline(config: PipelineConfig, store: Optional[str] = None,
                 task_runner: Optional[str] = None) -> dict[str, Any]:
    """Run the flow on a PipelineConfig (the CLI's entry point). ``task_runner``: thread,
    dask or ray (default $GPRUNE_TASK_RUNNER, else thread); no server needed: without
    PREFECT_API_URL Prefect starts a temporary local one."""
    runnable = gprune_flow
    if task_runner:
        runnable = gprune_flow.with_options(task_runner=make_task_runner(task_runner))
    return runnable(**config.model_dump(mode="json"), store=store)


__all__ = ["gprune_flow", "run_pipeline"]
