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
    _capture_pass(p)


def _capture_pass(p):
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n-sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    _stream(p)


def _stream(p, config_cls=None):
    from gprune.configs.capture import CalibrationPass

    field = (config_cls or CalibrationPass).model_fields["stream"]
    p.add_argument("--stream", choices=["auto", "on", "off"], default=field.default,
                   help=field.description)


def _gram(p):
    _capture(p)   # the capture's options: equal values select exactly the capture's tokens
    p.add_argument("--storage-dtype", choices=["float32", "float64"], default="float32",
                   help="dtype of the stored Grams (accumulation is always float64)")


def _contexts(p):
    p.add_argument("--sources", nargs="+", required=True, help="calibration sources, in order")
    p.add_argument("--seed", type=int, default=0)
    _capture_pass(p)   # the capture's options, for every source
    _method(p, "; its contexts settings (k, pca_dim, sample_tokens) are used")
    p.set_defaults(method="fang")


def _stats(p):
    p.add_argument("--capture", nargs="+", required=True, help="capture keys, one per source")


def _method(p, help_suffix: str = "") -> None:
    from gprune.methods.registry import method_names

    p.add_argument("--method", default="gprune",
                   help=f"method spec: name or name:key=value,... ({', '.join(method_names())})"
                        + help_suffix)


def _partition(p):
    p.add_argument("--stats", required=True)
    _method(p, "; its partition settings are used")


def _score(p):
    p.add_argument("--stats", required=True)
    p.add_argument("--partition", required=True)
    p.add_argument("--contexts", help="contexts key (methods that need it: fang)")
    _method(p, "; its score settings are used")


def _learning(p):
    p.add_argument("--score", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--no-attention", action="store_true", help="prune MLP channels only")
    p.add_argument("--steps", type=int, default=None, help="learned allocators: Adam steps")
    p.add_argument("--device", default="auto")


def _path(p):
    _learning(p)
    p.add_argument("--gram", nargs="+", help="gram keys, one per calibration source "
                                             "(allocators that need Grams, e.g. refit_error)")
    from gprune.configs.allocate import AllocateConfig

    _stream(p, AllocateConfig)
    _method(p, "; its allocator must use a path (learned_path, refit_error)")


def _allocate(p):
    _learning(p)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--path", help="path key (allocators that read a learned path)")
    p.add_argument("--gram", nargs="+", help="gram keys, one per calibration source "
                                             "(methods with kl_check; see `gprune stage gram`)")
    from gprune.configs.allocate import AllocateConfig

    _stream(p, AllocateConfig)
    _method(p, "; its allocator, reconstruction and label are used")


def _surgery(p):
    p.add_argument("--plan", required=True)
    p.add_argument("--stats", help="stats key (reconstruct=bias)")
    p.add_argument("--gram", nargs="+", help="gram keys, one per calibration source "
                                             "(reconstruct=lsq; see `gprune stage gram`)")
    p.add_argument("--reconstruct", choices=["none", "bias", "lsq"],
                   help="default: the plan's (its method's) reconstruction")
    p.add_argument("--ridge", type=float, default=1e-3, help="lsq damping")
    p.add_argument("--device", default="auto")
    from gprune.configs.surgery import SurgeryConfig

    _stream(p, SurgeryConfig)


def _evaluated(p, config, options: dict[str, str]) -> None:
    """The arguments of an evaluation stage: ``--model``, then per ``options`` entry
    (flag -> field of ``config``) an option with the field's default and description."""
    p.add_argument("--model", required=True, help="a surgery key or a dense model spec")
    for flag, name in {**options, "--device": "device", "--seed": "seed"}.items():
        field = config.model_fields[name]
        default = field.default
        if isinstance(default, tuple):
            p.add_argument(flag, nargs="+", default=list(default), help=field.description)
        else:
            p.add_argument(flag, type=type(default), default=default, help=field.description)


def _perplexity(p):
    from gprune.configs.perplexity import PerplexityConfig
    from gprune.configs.pipeline import DEFAULT_EVAL_SOURCES

    p.add_argument("--sources", nargs="+", default=list(DEFAULT_EVAL_SOURCES),
                   help="corpus sources whose held-out split is scored")
    _evaluated(p, PerplexityConfig, {"--tokens": "ppl_tokens", "--seq-len": "seq_len",
                                     "--batch-size": "batch_size"})
    _stream(p)


def _choice(p):
    from gprune.configs.choice import ChoiceConfig

    _evaluated(p, ChoiceConfig, {"--mc-tasks": "mc_tasks", "--mc-limit": "mc_limit",
                                 "--mc-batch-size": "mc_batch_size"})


def _speed(p):
    from gprune.configs.speed import SpeedConfig

    _evaluated(p, SpeedConfig, {"--prefill-tokens": "prefill_tokens",
                                "--decode-tokens": "decode_tokens", "--repeats": "repeats"})


def _export(p):
    p.add_argument("--model", required=True, help="a surgery key or a dense model spec")
    from gprune.configs.export import OUTTYPES

    p.add_argument("--outtype", default="f16", choices=OUTTYPES)


def _neurons(p):
    from gprune.cli_config import add_config_arguments
    from gprune.configs.neurons import NeuronsConfig

    p.add_argument("--model", default="smollm2", help="the dense model spec")
    add_config_arguments(p, NeuronsConfig)
    p.add_argument("--seed", type=int, default=0, help="the corpora's split seed")


def _attribution(p):
    from gprune.cli_config import add_config_arguments
    from gprune.configs.attribution import AttributionConfig

    p.add_argument("--neurons", required=True, help="neurons key (gprune stage neurons)")
    p.add_argument("--plan", required=True, help="plan key (stage allocate) of the same model")
    p.add_argument("--checkpoint", help="the plan's surgery key (adds the activation shift)")
    add_config_arguments(p, AttributionConfig)


def _report(p):
    p.add_argument("--evals", nargs="+", required=True,
                   help="perplexity, choice and speed keys (any mix; one per stage and model)")


ADDERS = {"corpus": _corpus, "capture": _capture, "gram": _gram, "contexts": _contexts,
          "stats": _stats,
          "partition": _partition,
          "score": _score, "path": _path, "allocate": _allocate, "surgery": _surgery,
          "perplexity": _perplexity, "choice": _choice, "speed": _speed, "report": _report, "export": _export,
          "neurons": _neurons, "attribution": _attribution}


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


def _capture_inputs(args, store, source: str | None = None):
    """(CaptureConfig, corpus key) from the capture options (capture, gram, contexts)."""
    from gprune.configs.capture import CaptureConfig
    from gprune.configs.corpus import CorpusConfig
    from tasks.corpus import run_corpus

    source = source or args.source
    config = CaptureConfig.build(source=source, n_sequences=args.n_sequences,
                                 seq_len=args.seq_len, batch_size=args.batch_size,
                                 seed=args.seed, device=args.device, stream=args.stream)
    return config, run_corpus(CorpusConfig.build(source=source, seed=args.seed), store)


def _run_capture(args, store):
    from tasks.capture import run_capture

    config, corpus_key = _capture_inputs(args, store)
    return run_capture(config, store, args.model, corpus_key, force=args.force)


def _run_gram(args, store):
    from gprune.configs.gram import GramConfig
    from tasks.gram import run_gram

    capture, corpus_key = _capture_inputs(args, store)
    config = GramConfig.from_capture(capture, storage_dtype=args.storage_dtype)
    return run_gram(config, store, args.model, corpus_key, force=args.force)


def _run_contexts(args, store):
    from gprune.configs.contexts import ContextsConfig
    from gprune.methods.registry import build_method
    from tasks.contexts import run_contexts

    captures, keys = zip(*(_capture_inputs(args, store, source) for source in args.sources))
    config = ContextsConfig.from_captures(list(captures),
                                          **build_method(args.method).contexts_settings())
    return run_contexts(config, store, args.model, list(keys), force=args.force)


def _run_stats(args, store):
    from gprune.configs.stats import StatsConfig
    from tasks.stats import run_stats

    return run_stats(StatsConfig(), store, args.capture, force=args.force)


def _run_partition(args, store):
    from gprune.methods.registry import build_method
    from tasks.partition import run_partition

    config = build_method(args.method).partition_config()
    return run_partition(config, store, args.stats, force=args.force)


def _run_score(args, store):
    from gprune.methods.registry import build_method
    from tasks.score import run_score

    config = build_method(args.method).score_config()
    return run_score(config, store, args.stats, args.partition, force=args.force,
                     contexts_key=args.contexts)


def _allocate_config(args, sparsity: float):
    from gprune.configs.allocate import AllocateConfig
    from gprune.methods.registry import build_method

    method = build_method(args.method)
    config = AllocateConfig.build(sparsity=sparsity, allocator=method.allocator,
                                  prune_attention=not args.no_attention and method.prunes_heads,
                                  steps=args.steps,
                                  ridge=method.ridge, kl_check=method.kl_check,
                                  allocator_params=method.allocator_params(),
                                  device=args.device, stream=getattr(args, "stream", "auto"))
    return method, config


def _run_path(args, store):
    from tasks.path import run_path

    _, config = _allocate_config(args, 0.5)  # the path serves every target
    return run_path(config, store, args.score, args.stats, force=args.force,
                    gram_keys=args.gram)


def _run_allocate(args, store):
    from tasks.allocate import run_allocate

    method, config = _allocate_config(args, args.sparsity)
    return run_allocate(config, store, args.score, args.stats, method=method.label,
                        reconstruct=method.reconstruct, force=args.force,
                        path_key=args.path, gram_keys=args.gram)


def _run_surgery(args, store):
    from gprune.configs.surgery import SurgeryConfig
    from tasks.surgery import run_surgery

    config = SurgeryConfig.build(reconstruct=args.reconstruct, ridge=args.ridge,
                                 device=args.device, stream=args.stream)
    return run_surgery(config, store, args.plan, args.stats, force=args.force,
                       gram_keys=args.gram)


def _run_perplexity(args, store):
    from gprune.configs.corpus import CorpusConfig
    from gprune.configs.perplexity import PerplexityConfig
    from tasks.corpus import run_corpus
    from tasks.perplexity import run_perplexity

    config = PerplexityConfig.build(ppl_tokens=args.tokens, seq_len=args.seq_len,
                                    batch_size=args.batch_size, device=args.device,
                                    seed=args.seed, stream=args.stream)
    corpora = {s: run_corpus(CorpusConfig.build(source=s), store) for s in args.sources}
    return run_perplexity(config, store, args.model, corpora, force=args.force)


def _run_choice(args, store):
    from gprune.configs.choice import ChoiceConfig
    from tasks.choice import run_choice

    config = ChoiceConfig.build(mc_tasks=tuple(args.mc_tasks), mc_limit=args.mc_limit,
                                mc_batch_size=args.mc_batch_size, device=args.device,
                                seed=args.seed)
    return run_choice(config, store, args.model, force=args.force)


def _run_speed(args, store):
    from gprune.configs.speed import SpeedConfig
    from tasks.speed import run_speed

    config = SpeedConfig.build(prefill_tokens=args.prefill_tokens,
                               decode_tokens=args.decode_tokens, repeats=args.repeats,
                               device=args.device, seed=args.seed)
    return run_speed(config, store, args.model, force=args.force)


def _run_report(args, store):
    from gprune.configs.report import ReportConfig
    from tasks.report import run_report

    return run_report(ReportConfig(), store, args.evals, force=args.force)


def _run_export(args, store):
    from gprune.configs.export import ExportConfig
    from tasks.export import run_export

    return run_export(ExportConfig(outtype=args.outtype), store, args.model, force=args.force)


def _run_neurons(args, store):
    from gprune.cli_config import config_from_args
    from gprune.configs.corpus import CorpusConfig
    from gprune.configs.neurons import NeuronsConfig
    from tasks.corpus import run_corpus
    from tasks.neurons import run_neurons

    config = config_from_args(args, NeuronsConfig)
    corpora = [run_corpus(CorpusConfig.build(source=s, seed=args.seed), store)
               for s in config.sources]
    return run_neurons(config, store, args.model, corpora, force=args.force)


def _run_attribution(args, store):
    import time

    from gprune.cli_config import config_from_args
    from gprune.configs.attribution import AttributionConfig
    from tasks.attribution import run_attribution

    config = config_from_args(args, AttributionConfig)
    started = time.time()
    key = run_attribution(config, store, args.neurons, args.plan, args.checkpoint,
                          force=args.force)
    print(f"attribution wall time: {time.time() - started:.1f} s")
    return key


RUNNERS = {"corpus": _run_corpus, "capture": _run_capture, "gram": _run_gram,
           "contexts": _run_contexts,
           "stats": _run_stats,
           "partition": _run_partition, "score": _run_score, "path": _run_path,
           "allocate": _run_allocate,
           "surgery": _run_surgery, "perplexity": _run_perplexity, "choice": _run_choice,
           "speed": _run_speed, "report": _run_report, "export": _run_export,
           "neurons": _run_neurons, "attribution": _run_attribution}
