"""Prefect tasks of the gprune flow: one thin, typed wrapper per stage function.

Each task takes stage configs, the store root and input artifact keys, calls the
stage's plain ``tasks.<stage>.run_<stage>`` and returns the output artifact key; no
tensors cross a task boundary. Caching: ``flows.cache.ARTIFACT_CACHE`` (the Prefect
cache key is the artifact key; an artifact that is gone is never served from cache).
Retries only where the work is I/O: loading a corpus (the Hub when online) and
publishing the report to the Prefect API.
"""
from __future__ import annotations

from typing import Optional

from prefect import task

from flows.cache import ARTIFACT_CACHE, run_cached
from gprune.configs.allocate import AllocateConfig
from gprune.configs.attribution import AttributionConfig
from gprune.configs.capture import CaptureConfig
from gprune.configs.choice import ChoiceConfig
from gprune.configs.contexts import ContextsConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.export import ExportConfig
from gprune.configs.gram import GramConfig
from gprune.configs.neurons import NeuronsConfig
from gprune.configs.partition import PartitionConfig
from gprune.configs.perplexity import PerplexityConfig
from gprune.configs.report import ReportConfig
from gprune.configs.score import ScoreConfig
from gprune.configs.speed import SpeedConfig
from gprune.configs.stats import StatsConfig
from gprune.configs.surgery import SurgeryConfig

STAGE_TASK = dict(cache_policy=ARTIFACT_CACHE, persist_result=True)


@task(name="corpus", task_run_name="corpus-{config.source}", retries=2,
      retry_delay_seconds=5, **STAGE_TASK)
def corpus(config: CorpusConfig, store_root: str, stamp: str, force: bool = False) -> str:
    """``stamp`` (flows.cache.source_stamp) only identifies the source's content."""
    from tasks.corpus import run_corpus

    return run_cached("corpus", store_root, lambda s: run_corpus(config, s, force=force))


@task(name="capture", task_run_name="capture-{config.source}", **STAGE_TASK)
def capture(config: CaptureConfig, store_root: str, model: str, model_fingerprint: str,
            corpus_key: str, force: bool = False, gram: Optional[GramConfig] = None) -> str:
    """``model_fingerprint`` only identifies the weights behind the ``model`` spec;
    ``gram``: also store that gram artifact from the same forward pass (when not stored)."""
    from tasks.capture import run_capture

    return run_cached("capture", store_root,
                      lambda s: run_capture(config, s, model, corpus_key, force=force,
                                            gram=gram))


@task(name="gram", task_run_name="gram-{config.source}", **STAGE_TASK)
def gram(config: GramConfig, store_root: str, model: str, model_fingerprint: str,
         corpus_key: str, force: bool = False) -> str:
    """Gram matrices of one source (the capture's tokens); as ``capture``."""
    from tasks.gram import run_gram

    return run_cached("gram", store_root,
                      lambda s: run_gram(config, s, model, corpus_key, force=force))


@task(name="stats", **STAGE_TASK)
def stats(config: StatsConfig, store_root: str, capture_keys: list[str],
          force: bool = False) -> str:
    from tasks.stats import run_stats

    return run_cached("stats", store_root,
                      lambda s: run_stats(config, s, list(capture_keys), force=force))


@task(name="partition", **STAGE_TASK)
def partition(config: PartitionConfig, store_root: str, stats_key: str,
              force: bool = False) -> str:
    from tasks.partition import run_partition

    return run_cached("partition", store_root,
                      lambda s: run_partition(config, s, stats_key, force=force))


@task(name="contexts", **STAGE_TASK)
def contexts(config: ContextsConfig, store_root: str, model: str, model_fingerprint: str,
             corpus_keys: list[str], force: bool = False) -> str:
    """FANG's token contexts over the calibration sources (one artifact for every target)."""
    from tasks.contexts import run_contexts

    return run_cached("contexts", store_root, lambda s: run_contexts(
        config, s, model, list(corpus_keys), force=force))


@task(name="score", **STAGE_TASK)
def score(config: ScoreConfig, store_root: str, stats_key: str, partition_key: str,
          force: bool = False, contexts_key: Optional[str] = None) -> str:
    """``contexts_key``: the contexts artifact (methods that need "contexts")."""
    from tasks.score import run_score

    return run_cached("score", store_root, lambda s: run_score(
        config, s, stats_key, partition_key, force=force, contexts_key=contexts_key))


@task(name="path", task_run_name="path-{method}", **STAGE_TASK)
def path(config: AllocateConfig, store_root: str, score_key: str, stats_key: str,
         method: str, force: bool = False, gram_keys: Optional[list[str]] = None) -> str:
    """The learned path every target of ``method`` reads (``config.sparsity`` unused)."""
    from tasks.path import run_path

    return run_cached("path", store_root,
                      lambda s: run_path(config, s, score_key, stats_key, force=force,
                                         gram_keys=list(gram_keys) if gram_keys else None))


@task(name="allocate", task_run_name="allocate-{method}-{config.sparsity}", **STAGE_TASK)
def allocate(config: AllocateConfig, store_root: str, score_key: str, stats_key: str,
             method: str, reconstruct: str, force: bool = False,
             path_key: Optional[str] = None, gram_keys: Optional[list[str]] = None) -> str:
    """``gram_keys``: the calibration sources' Grams (``config.kl_check``)."""
    from tasks.allocate import run_allocate

    return run_cached("allocate", store_root, lambda s: run_allocate(
        config, s, score_key, stats_key, method=method, reconstruct=reconstruct,
        force=force, path_key=path_key, gram_keys=list(gram_keys) if gram_keys else None))


@task(name="surgery", **STAGE_TASK)
def surgery(config: SurgeryConfig, store_root: str, plan_key: str, stats_key: str,
            force: bool = False, gram_keys: Optional[list[str]] = None) -> str:
    """``gram_keys``: the calibration sources' gram artifacts (reconstruct=lsq)."""
    from tasks.surgery import run_surgery

    return run_cached("surgery", store_root, lambda s: run_surgery(
        config, s, plan_key, stats_key, force=force,
        gram_keys=list(gram_keys) if gram_keys else None))


# evaluation tasks: ``model`` is a surgery key or the dense model spec (then
# ``model_fingerprint`` identifies its weights; for a surgery key it repeats the key)
@task(name="perplexity", **STAGE_TASK)
def perplexity(config: PerplexityConfig, store_root: str, model: str, model_fingerprint: str,
               corpus_keys: dict[str, str], force: bool = False) -> str:
    from tasks.perplexity import run_perplexity

    return run_cached("perplexity", store_root, lambda s: run_perplexity(
        config, s, model, dict(corpus_keys), force=force))


@task(name="choice", **STAGE_TASK)
def choice(config: ChoiceConfig, store_root: str, model: str, model_fingerprint: str,
           task_stamps: list[str], force: bool = False) -> str:
    """``task_stamps`` (flows.cache.source_stamp per task) only identify task files' content."""
    from tasks.choice import run_choice

    return run_cached("choice", store_root, lambda s: run_choice(config, s, model, force=force))


@task(name="speed", **STAGE_TASK)
def speed(config: SpeedConfig, store_root: str, model: str, model_fingerprint: str,
          force: bool = False) -> str:
    from tasks.speed import run_speed

    return run_cached("speed", store_root, lambda s: run_speed(config, s, model, force=force))


@task(name="export", **STAGE_TASK)
def export(config: ExportConfig, store_root: str, model: str, force: bool = False) -> str:
    """A surgery checkpoint (``model``: its key) as a GGUF file for llama.cpp."""
    from tasks.export import run_export

    return run_cached("export", store_root, lambda s: run_export(config, s, model, force=force))


@task(name="neurons", **STAGE_TASK)
def neurons(config: NeuronsConfig, store_root: str, model: str, model_fingerprint: str,
            corpus_keys: list[str], force: bool = False) -> str:
    """NSA steps 1-2 on the dense model (one artifact for every plan)."""
    from tasks.neurons import run_neurons

    return run_cached("neurons", store_root, lambda s: run_neurons(
        config, s, model, list(corpus_keys), force=force))


@task(name="attribution", task_run_name="attribution-{plan_key}", **STAGE_TASK)
def attribution(config: AttributionConfig, store_root: str, neurons_key: str, plan_key: str,
                checkpoint_key: Optional[str] = None, force: bool = False) -> str:
    """NSA step 3: what one plan removed, in words."""
    from tasks.attribution import run_attribution

    return run_cached("attribution", store_root, lambda s: run_attribution(
        config, s, neurons_key, plan_key, checkpoint_key, force=force))


@task(name="report", **STAGE_TASK)
def report(config: ReportConfig, store_root: str, eval_keys: list[str],
           force: bool = False) -> str:
    from tasks.report import run_report

    return run_cached("report", store_root,
                      lambda s: run_report(config, s, list(eval_keys), force=force))


@task(name="publish-report", retries=2, retry_delay_seconds=5)
def publish(report_dir: str) -> bool:
    """Markdown and table artifacts of the report in the Prefect UI (API I/O)."""
    from gprune.report.publish import publish_to_prefect

    return publish_to_prefect(report_dir)


@task(name="publish-attribution", retries=2, retry_delay_seconds=5)
def publish_attribution(folder: str, name: str) -> bool:
    """An attribution's summary as a Markdown artifact in the Prefect UI (API I/O)."""
    from gprune.report.publish import publish_attribution as publish_it

    return publish_it(folder, name)
