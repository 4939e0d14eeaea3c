"""`gprune stage <name>`: run one stage against cached input artifacts, print its key.

Inputs are artifact keys (as printed by earlier stages or `gprune ls`); a
stage whose artifact already exists returns at once unless --force.
"""
from __future__ import annotations

import argparse

from artifacts.store import ArtifactStore


def add_arguments(stage: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    ADDERS[stage](p)


def _corpus(p):
    p.add_argument("--source", required=True, help="wikipedia, web, code, news, math, docs, "
                                                   "hf:<id> or a local .txt/.jsonl/.parquet")
    p.add_argument("--seed", type=int, default=0)


def _capture(p):
    _corpus(p)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")


def _stats(p):
    p.add_argument("--capture", nargs="+", required=True, help="capture keys, one per source")


def _partition(p):
    p.add_argument("--stats", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--metric", default="wanda_sp", choices=["wanda_sp", "flap"])


def _score(p):
    p.add_argument("--stats", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--metric", default="wanda_sp", choices=["wanda_sp", "flap", "weight"])
    p.add_argument("--aggregate", default="normalized_mean", choices=["normalized_mean", "pooled"])
    p.add_argument("--no-gate", action="store_true")


def _allocate(p):
    p.add_argument("--score", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--allocator", default="learned_path",
                   choices=["learned_path", "learned", "uniform", "flap"])
    p.add_argument("--method", default="gprune", help="label recorded in the plan")
    p.add_argument("--bias-compensation", action="store_true")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="learned allocators: Adam steps")
    p.add_argument("--device", default="auto")


def _surgery(p):
    p.add_argument("--plan", required=True)
    p.add_argument("--stats", help="stats key (needed for bias compensation)")
    p.add_argument("--bias-compensation", action="store_true")
    p.add_argument("--device", default="auto")


def _evaluate(p):
    from gprune.configs.evaluate import EvalConfig
    from gprune.configs.pipeline import DEFAULT_EVAL_SOURCES

    defaults = EvalConfig.model_fields
    p.add_argument("--model", required=True, help="a surgery key or a dense model spec")
    p.add_argument("--sources", nargs="*", default=list(DEFAULT_EVAL_SOURCES))
    p.add_argument("--tokens", type=int, default=defaults["ppl_tokens"].default)
    p.add_argument("--mc-tasks", nargs="*", default=list(defaults["mc_tasks"].default))
    p.add_argument("--mc-limit", type=int, default=defaults["mc_limit"].default)
    p.add_argument("--speed", action="store_true", help="also time prefill/decode")
    p.add_argument("--device", default="auto")


def _report(p):
    p.add_argument("--evals", nargs="+", required=True, help="evaluate keys")


ADDERS = {"corpus": _corpus, "capture": _capture, "stats": _stats, "partition": _partition,
          "score": _score, "allocate": _allocate, "surgery": _surgery, "evaluate": _evaluate,
          "report": _report}


def run(args) -> int:
    store = ArtifactStore(args.store)
    key = RUNNERS[args.stage](args, store)
    print(key)
    print(f"path: {store.path(key)}")
    return 0


def _run_corpus(args, store):
    from gprune.configs.corpus import CorpusConfig
    from tasks.corpus import run_corpus

    return run_corpus(CorpusConfig.build(source=args.source, seed=args.seed), store, force=args.force)


def _run_capture(args, store):
    from gprune.configs.capture import CaptureConfig
    from gprune.configs.corpus import CorpusConfig
    from tasks.capture import run_capture
    from tasks.corpus import run_corpus

    config = CaptureConfig.build(source=args.source, n_sequences=args.n_sequences,
                                 seq_len=args.seq_len, batch_size=args.batch_size,
                                 seed=args.seed, device=args.device)
    corpus_key = run_corpus(CorpusConfig.build(source=args.source, seed=args.seed), store)
    return run_capture(config, store, args.model, corpus_key, force=args.force)


def _run_stats(args, store):
    from gprune.configs.stats import StatsConfig
    from tasks.stats import run_stats

    return run_stats(StatsConfig(), store, args.capture, force=args.force)


def _run_partition(args, store):
    from gprune.configs.partition import PartitionConfig
    from tasks.partition import run_partition

    config = PartitionConfig.build(k=args.k, metric=args.metric)
    return run_partition(config, store, args.stats, force=args.force)


def _run_score(args, store):
    from gprune.configs.score import ScoreConfig
    from tasks.score import run_score

    config = ScoreConfig.build(metric=args.metric, aggregate=args.aggregate, gate=not args.no_gate)
    return run_score(config, store, args.stats, args.partition, force=args.force)


def _run_allocate(args, store):
    from gprune.configs.allocate import AllocateConfig
    from tasks.allocate import run_allocate

    config = AllocateConfig.build(sparsity=args.sparsity, allocator=args.allocator,
                                  prune_attention=not args.no_attention, steps=args.steps,
                                  device=args.device)
    return run_allocate(config, store, args.score, args.stats, method=args.method,
                        bias_compensation=args.bias_compensation, force=args.force)


def _run_surgery(args, store):
    from gprune.configs.surgery import SurgeryConfig
    from tasks.surgery import run_surgery

    config = SurgeryConfig.build(bias_compensation=args.bias_compensation, device=args.device)
    return run_surgery(config, store, args.plan, args.stats, force=args.force)


def _run_evaluate(args, store):
    from gprune.configs.corpus import CorpusConfig
    from gprune.configs.evaluate import EvalConfig
    from tasks.corpus import run_corpus
    from tasks.evaluate import run_evaluate

    config = EvalConfig.build(ppl_tokens=args.tokens, mc_tasks=tuple(args.mc_tasks),
                              mc_limit=args.mc_limit, speed=args.speed, device=args.device)
    corpora = {s: run_corpus(CorpusConfig.build(source=s), store) for s in args.sources}
    return run_evaluate(config, store, args.model, corpora, force=args.force)


def _run_report(args, store):
    from gprune.configs.report import ReportConfig
    from tasks.report import run_report

    return run_report(ReportConfig(), store, args.evals, force=args.force)


RUNNERS = {"corpus": _run_corpus, "capture": _run_capture, "stats": _run_stats,
           "partition": _run_partition, "score": _run_score, "allocate": _run_allocate,
           "surgery": _run_surgery, "evaluate": _run_evaluate, "report": _run_report}
