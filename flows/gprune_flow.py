"""The ``gprune`` Prefect flow: every stage, chained as tasks that exchange artifact keys.

    corpus (mapped) -> capture (mapped over sources) -> stats -> partition -> score
      (+ contexts, FANG's token contexts over the sources, when a method needs them)
      (+ gram, mapped over sources, when a method needs Gram statistics: each capture
       then accumulates its source's Grams in the same forward pass, and the gram tasks
       only reuse them unless the captures were cached or the gram is forced)
      -> for each method: path (learned once)
      -> for each method and target sparsity: allocate -> surgery (-> export: a GGUF
         for llama.cpp, with ``export`` set)
      (-> with ``attribution``: neurons once, then attribution per plan (NSA: what each
       plan removed, in words), linked from the report and published)
      -> perplexity, choice, speed (the dense model, then each checkpoint, one at a time)
      -> report -> publish

Parameters: ``config``, a ``gprune.configs.pipeline.PipelineConfig`` (every parameter of
the job, declared once there; Prefect shows its fields in the UI and validates a JSON
``{"config": {...}}``), and ``store`` (the artifact store root; None = $GPRUNE_STORE or
~/.cache/gprune/store), so a caller runs ``gprune_flow(config=PipelineConfig(...))``
(or ``run_pipeline``). ``preflight`` runs
before any task: bad input fails in seconds with a one-line error. Methods that share
a partition or score config share the task (and the artifact); one capture, stats,
partition and score serve every target. ``force`` names stages to recompute.

Orchestration only: the maths is in ``gprune``, each stage in ``tasks/``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from prefect import allow_failure, flow, unmapped
from prefect.logging import get_run_logger

from artifacts.store import ArtifactStore
from flows import stages
from flows.cache import source_stamp
from flows.runners import make_task_runner
from gprune.configs.contexts import ContextsConfig
from gprune.configs.gram import GramConfig
from gprune.configs.pipeline import PipelineConfig, preflight
from gprune.configs.report import ReportConfig
from gprune.configs.stats import StatsConfig
from gprune.methods.allocators import allocator
from gprune.methods.registry import Method


@flow(name="gprune", task_runner=make_task_runner(), validate_parameters=True,
      log_prints=True)
def gprune_flow(config: PipelineConfig = PipelineConfig(),  # noqa: B008 (frozen, immutable)
                store: Optional[str] = None) -> dict[str, Any]:
    """Prune ``config.model`` to every sparsity with every method; evaluate and report."""
    ref, _shape = preflight(config)
    root = str(ArtifactStore(store).root)
    logger = get_run_logger()
    logger.info("gprune: %s (%s), %d method(s) x %d target(s), store %s", config.model,
                ref.family, len(config.methods), len(config.sparsities), root)

    corpora = _corpora(config, root)
    companions = _gram_configs(config)
    capture_keys = stages.capture.map(
        [config.capture_config(s) for s in config.sources], unmapped(root),
        unmapped(config.model), unmapped(ref.fingerprint), [corpora[s] for s in config.sources],
        force=unmapped(config.forced("capture")),
        gram=[companions.get(s) if not config.forced("gram") else None
              for s in config.sources])
    stats_key = stages.stats.submit(StatsConfig(), root, capture_keys,
                                    force=config.forced("stats"))
    contexts: dict[str, Any] = {}
    plans, checkpoints, gram_keys = _targets(
        config, root, stats_key,
        lambda: _grams(config, root, ref.fingerprint, corpora, companions, capture_keys),
        lambda method: _contexts(config, root, ref.fingerprint, corpora, method, contexts))
    result = {"store": root, "stats": stats_key.result(),
              "plans": {name: f.result() for name, f in plans.items()},
              "checkpoints": {name: f.result() for name, f in checkpoints.items()}}
    exports = {} if config.export_config() is None else {
        name: stages.export.submit(config.export_config(), root, f,
                                   force=config.forced("export")).result()
        for name, f in checkpoints.items()}
    if exports:
        result["exports"] = exports
    if gram_keys:
        result["gram_keys"] = {source: f.result() for source, f in gram_keys.items()}
    attributions = _attributions(config, root, ref.fingerprint, corpora, plans, checkpoints)
    if attributions:
        result["attributions"] = attributions
    if config.evaluate:
        result.update(_evaluate_and_report(config, root, ref.fingerprint, corpora, checkpoints,
                                           list(exports.values()) + list(attributions.values())))
        logger.info("gprune: report at %s", result["report_dir"])
    else:
        logger.info("gprune: %d checkpoint(s) in %s (evaluation off)", len(checkpoints), root)
    return result


def _attributions(config: PipelineConfig, root: str, fingerprint: str, corpora: dict,
                  plans: dict, checkpoints: dict) -> dict[str, str]:
    """With ``attribution``: the neurons task once (the first calibration source), then one
    attribution per plan (with its checkpoint), each published to the Prefect UI; plan
    name -> attribution key. {} otherwise."""
    neurons_config = config.neurons_config()
    if neurons_config is None:
        return {}
    sources = list(neurons_config.sources)
    neurons_key = stages.neurons.submit(neurons_config, root, config.model, fingerprint,
                                        [corpora[s] for s in sources],
                                        force=config.forced("neurons"))
    futures = {name: stages.attribution.submit(config.attribution_config(), root, neurons_key,
                                               plan, checkpoints[name],
                                               force=config.forced("attribution"))
               for name, plan in plans.items()}
    keys = {name: f.result() for name, f in futures.items()}
    for name, key in keys.items():
        stages.publish_attribution.submit(str(ArtifactStore(root).path(key)), name).result()
    return keys


def _corpora(config: PipelineConfig, root: str) -> dict:
    """One corpus task per distinct calibration or evaluation source: source -> future."""
    names = list(dict.fromkeys([*config.sources, *(config.eval_sources if config.evaluate
                                                   else [])]))
    futures = stages.corpus.map([config.corpus_config(s) for s in names], unmapped(root),
                                [source_stamp(s) for s in names],
                                force=unmapped(config.forced("corpus")))
    return dict(zip(names, futures))


def _gram_configs(config: PipelineConfig) -> dict[str, GramConfig]:
    """source -> the gram config of its capture's tokens, when any method needs Gram
    statistics (``"gram" in method.needs``); {} otherwise."""
    if not any("gram" in method.needs for method in config.method_objects()):
        return {}
    return {s: GramConfig.from_capture(config.capture_config(s)) for s in config.sources}


def _grams(config: PipelineConfig, root: str, fingerprint: str, corpora: dict,
           companions: dict[str, GramConfig], capture_keys) -> dict:
    """One gram task per calibration source: source -> future; {} when no method needs
    Grams. They wait for the captures, which accumulate the Grams in their own forward
    pass when they run (a gram task then reuses them); else a gram task computes them."""
    if not companions:
        return {}
    futures = stages.gram.map(
        [companions[s] for s in config.sources],
        unmapped(root), unmapped(config.model), unmapped(fingerprint),
        [corpora[s] for s in config.sources], force=unmapped(config.forced("gram")),
        wait_for=list(capture_keys))
    return dict(zip(config.sources, futures))


def _contexts(config: PipelineConfig, root: str, fingerprint: str, corpora: dict,
              method: Method, submitted: dict):
    """The contexts task of a method that needs "contexts" (None otherwise), one per
    distinct config (FANG variants with equal settings share it)."""
    if "contexts" not in method.needs:
        return None
    cfg = ContextsConfig.from_captures([config.capture_config(s) for s in config.sources],
                                       **method.contexts_settings())
    ident = cfg.model_dump_json()
    if ident not in submitted:
        submitted[ident] = stages.contexts.submit(
            cfg, root, config.model, fingerprint, [corpora[s] for s in config.sources],
            force=config.forced("contexts"))
    return submitted[ident]


def _targets(config: PipelineConfig, root: str, stats_key,
             submit_grams: Callable[[], dict],
             contexts_of: Callable[[Method], Any]) -> tuple[dict, dict, dict]:
    """Partition and score once per distinct config, a path once per method that uses
    one, then allocate + surgery per target; returns (plans, checkpoints, gram futures).

    Submitted stage by stage (every allocate before any surgery): a task waiting on its
    upstream holds a runner slot, so this order keeps the slots on runnable work. The
    Gram tasks are submitted after the paths that do not need them, so a learned path
    runs while the Grams accumulate."""
    methods = config.method_objects()
    scored: dict[str, Any] = {}
    scores = {m.label: _score(config, root, stats_key, m, scored, contexts_of(m))
              for m in methods}
    gram_path = {m.label: allocator(m.allocator).needs_gram
                 or config.allocate_config(m, 0.5).path_refines for m in methods}
    paths = {m.label: _path(config, root, stats_key, scores[m.label], m, None)
             for m in methods if not gram_path[m.label]}
    gram_keys = submit_grams()                                  # source -> future, or {}
    grams = list(gram_keys.values())
    paths.update({m.label: _path(config, root, stats_key, scores[m.label], m, grams)
                  for m in methods if gram_path[m.label]})
    plans, by_name = {}, {}
    for method in methods:
        for sparsity in config.sparsities:
            name = f"{method.label}@{sparsity:g}"
            by_name[name] = method
            plans[name] = stages.allocate.submit(
                config.allocate_config(method, sparsity), root, scores[method.label],
                stats_key, method.label, method.reconstruct,
                force=config.forced("allocate"), path_key=paths[method.label],
                gram_keys=grams if method.kl_check else None)
    checkpoints = {name: stages.surgery.submit(
        config.surgery_config(by_name[name]), root, plan, stats_key,
        force=config.forced("surgery"),
        gram_keys=grams if by_name[name].reconstruct == "lsq" else None)
        for name, plan in plans.items()}
    return plans, checkpoints, gram_keys


def _path(config: PipelineConfig, root: str, stats_key, score_key, method: Method,
          grams: Optional[list]):
    """The path of a method whose allocator has one (None otherwise)."""
    if not method.serves_all_targets:
        return None
    # the path does not depend on the target: a fixed placeholder keeps the task's Prefect
    # cache key independent of the run's sparsities
    return stages.path.submit(config.allocate_config(method, 0.5), root, score_key, stats_key,
                              method.label, force=config.forced("path"), gram_keys=grams)


def _score(config: PipelineConfig, root: str, stats_key, method: Method, scored: dict,
           contexts=None) -> Any:
    """Partition and score tasks, shared by methods whose configs are equal; ``contexts``:
    the contexts task future of a method that reads one."""
    part_cfg, score_cfg = method.partition_config(), method.score_config()
    part_id = part_cfg.model_dump_json()
    score_id = part_id + score_cfg.model_dump_json() + str(id(contexts) if contexts else "")
    if part_id not in scored:
        scored[part_id] = stages.partition.submit(part_cfg, root, stats_key,
                                                  force=config.forced("partition"))
    if score_id not in scored:
        scored[score_id] = stages.score.submit(score_cfg, root, stats_key, scored[part_id],
                                               force=config.forced("score"),
                                               contexts_key=contexts)
    return scored[score_id]


def _evaluate_and_report(config: PipelineConfig, root: str, fingerprint: str, corpora: dict,
                         checkpoints: dict, export_keys: list[str]) -> dict[str, Any]:
    """Evaluate the dense model and every checkpoint, one after another; report; publish.

    Per model (dense first): ``perplexity``, then ``choice`` (when there are mc_tasks),
    then ``speed`` (``speed=True``), each its own artifact. One task at a time on purpose:
    each uses every CPU thread (two at once oversubscribe the cores and took about twice as
    long in total), a speed probe does not share the machine with another evaluation, and
    progress output does not interleave. A failed task does not stop the next
    (``allow_failure``); the report then fails. ``evals``: run name -> {stage: key}.
    ``export_keys``: GGUF exports, whose sizes the report states."""
    eval_corpora = {s: corpora[s] for s in config.eval_sources}
    task_stamps = [source_stamp(t) for t in config.mc_tasks]
    plan = [(stage, task, stage_config, args) for stage, task, stage_config, args in (
        ("perplexity", stages.perplexity, config.perplexity_config(), (eval_corpora,)),
        ("choice", stages.choice, config.choice_config(), (task_stamps,)),
        ("speed", stages.speed, config.speed_config(), ())) if stage_config is not None]
    # name -> (model, identity); surgery futures resolve in the task
    models = {"dense": (config.model, fingerprint), **{n: (f, f) for n, f in checkpoints.items()}}
    evals: dict[str, dict[str, Any]] = {name: {} for name in models}
    last = None
    for name, (model, identity) in models.items():
        for stage, task, stage_config, args in plan:
            last = evals[name][stage] = task.submit(
                stage_config, root, model, identity, *args, force=config.forced(stage),
                wait_for=[allow_failure(last)] if last is not None else None)
    futures = [f for per_model in evals.values() for f in per_model.values()]
    report_key = stages.report.submit(ReportConfig(), root, futures + export_keys,
                                      force=config.forced("report")).result()
    report_dir = str(ArtifactStore(root).path(report_key))
    stages.publish.submit(report_dir).result()
    return {"evals": {name: {stage: f.result() for stage, f in per_model.items()}
                      for name, per_model in evals.items()},
            "report": report_key, "report_dir": report_dir}


def run_pipeline(config: PipelineConfig, store: Optional[str] = None,
                 task_runner: Optional[str] = None) -> dict[str, Any]:
    """Run the flow on a PipelineConfig (the CLI's entry point). ``task_runner``: thread,
    dask or ray (default $GPRUNE_TASK_RUNNER, else thread); no server needed: without
    PREFECT_API_URL Prefect starts a temporary local one."""
    runnable = gprune_flow
    if task_runner:
        runnable = gprune_flow.with_options(task_runner=make_task_runner(task_runner))
    return runnable(config=config, store=store)


__all__ = ["gprune_flow", "run_pipeline"]
