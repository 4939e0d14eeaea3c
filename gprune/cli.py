"""The `gprune` command line: run the whole job, run one stage, list and verify the store.

Every user error ends as one line on stderr and exit status 2; nothing in the
store is touched by a failed command.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from gprune import __version__
from gprune.errors import GpruneError

STAGE_HELP = {
    "corpus": "materialize a text source with calibration/held-out splits",
    "capture": "stage 1: activation statistics of one source",
    "gram": "stage 1b: Gram matrices of the output-projection inputs of one source "
            "(capture's tokens; for lsq reconstruction)",
    "contexts": "stage 1c: FANG's token contexts: sampled MLP inputs per layer, PCA, k-means "
                "(capture's tokens, every source)",
    "stats": "stage 2: per-unit metrics, ranks and sensitivity over captures",
    "partition": "stage 3: module partition of each layer",
    "score": "stage 4: unit scores by a method (gprune: reliability-gated, module-local)",
    "path": "stage 5a: the learned path of keep fractions that every target reads",
    "allocate": "stage 5b: a pruning plan for one target sparsity",
    "surgery": "stage 6: slice the model to a plan and save the checkpoint",
    "export": "stage 6b: a checkpoint as a llama.cpp GGUF file (also: gprune export gguf)",
    "perplexity": "stage 7: held-out perplexity per source, size and FLOPs of a checkpoint",
    "choice": "stage 7: multiple-choice accuracy of a checkpoint per task",
    "speed": "stage 7: prefill/decode tokens/s of a checkpoint (pruned: vs its dense source)",
    "neurons": "stage 8a (NSA): each unit's top words over a corpus and each task's "
               "influential words (dense model; plan-independent)",
    "attribution": "stage 8b (NSA): which influential words a plan took the units of "
                   "(HTML page, PNG figures)",
    "report": "stage 7: table, Markdown report and plots over evaluations",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gprune", description=(
        "Generalization-aware structured pruning of LLMs (GPrune-LLM) as a cached pipeline."))
    parser.add_argument("--version", action="version", version=f"gprune {__version__}")
    parser.add_argument("--store", help="artifact store folder (default: $GPRUNE_STORE or "
                                        "~/.cache/gprune/store)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub.add_parser("run", help="run the whole job (the gprune Prefect flow)"))
    stage = sub.add_parser("stage", help="run one stage from cached artifacts")
    stages = stage.add_subparsers(dest="stage", required=True, metavar="STAGE")
    from gprune import cli_stages

    for name, text in STAGE_HELP.items():
        cli_stages.add_arguments(name, stages.add_parser(name, help=text, description=text))
    ls = sub.add_parser("ls", help="list the artifacts in the store")
    ls.add_argument("--stage", help="only this stage")
    show = sub.add_parser("show", help="print an artifact's manifest")
    show.add_argument("key")
    verify = sub.add_parser("verify", help="check every file hash of artifacts (default: all)")
    verify.add_argument("keys", nargs="*", metavar="KEY", help="artifact keys (default: all)")
    verify.add_argument("--quarantine", action="store_true",
                        help="move corrupt artifacts to <store>/.quarantine/")
    _add_export(sub.add_parser("export", help="write a checkpoint for an inference engine"))
    return parser


def _add_export(p: argparse.ArgumentParser) -> None:
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser("gguf", help="a GGUF file for llama.cpp (deci architecture, "
                                           "per-layer MLP widths and head counts)")
    gguf.add_argument("checkpoint", help="a pruned checkpoint folder, a surgery artifact key, "
                                         "or a dense Llama-family model (folder or spec)")
    gguf.add_argument("--outtype", default="f16",
                      help="f32, f16 or q8_0 (default: f16)")
    gguf.add_argument("-o", "--output", help="the GGUF file to write (default: "
                                             "./<checkpoint name>-<outtype>.gguf)")


def cmd_export(args) -> int:
    from gprune.export.cli import export_command

    print(export_command(args.checkpoint, args.outtype, args.output))
    return 0


def _add_run(p: argparse.ArgumentParser) -> None:
    """One option per PipelineConfig field (its default and description)."""
    from gprune.cli_config import add_config_arguments
    from gprune.configs.pipeline import PipelineConfig
    from gprune.methods.registry import method_class, method_names

    add_config_arguments(p, PipelineConfig)
    summaries = [(name, method_class(name).summary) for name in method_names()]
    methods = next(a for a in p._actions if a.dest == "methods")
    methods.help += "; methods: " + ", ".join(f"{n} ({text})" if text else n
                                             for n, text in summaries)


def pipeline_from_args(args):
    from gprune.cli_config import config_from_args
    from gprune.configs.pipeline import PipelineConfig

    return config_from_args(args, PipelineConfig)


def cmd_run(args) -> int:
    from gprune.configs.pipeline import preflight

    config = pipeline_from_args(args)
    preflight(config)  # one-line errors before Prefect or any stage starts
    from flows.gprune_flow import run_pipeline

    result = run_pipeline(config, store=args.store)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_ls(args) -> int:
    from artifacts.store import ArtifactStore

    store = ArtifactStore(args.store)
    rows = [a for a in store.list() if not args.stage or a.stage == args.stage]
    print(f"store: {store.root} ({len(rows)} artifacts)")
    for art in rows:
        size = art.manifest.get("total_bytes", 0) / 1e6
        print(f"{art.key:32s} {art.manifest.get('created', ''):21s} {size:9.2f} MB  "
              f"{_summary(art)}")
    return 0


def _summary(art) -> str:
    extra, params = art.extra, art.params
    for name in ("source", "method", "sparsity", "target_sparsity", "achieved_sparsity", "tokens"):
        if name in params:
            extra = {name: params[name], **extra}
    keep = ("source", "method", "target_sparsity", "sparsity", "achieved_sparsity", "tokens",
            "sources")
    return " ".join(f"{k}={extra[k]}" for k in keep if k in extra)


def cmd_show(args) -> int:
    from artifacts.store import ArtifactStore

    art = ArtifactStore(args.store).read(args.key)
    print(json.dumps(art.manifest, indent=2, sort_keys=True))
    print(f"path: {art.path}")
    return 0


def cmd_verify(args) -> int:
    """One line per artifact (ok / CORRUPT: why); exit 1 when any is corrupt."""
    from artifacts.store import ArtifactStore
    from gprune.errors import ArtifactError, CorruptArtifactError

    store = ArtifactStore(args.store)
    keys = list(dict.fromkeys(args.keys)) or store.keys()
    unknown = [k for k in keys if not store.exists(k)]
    if unknown:
        raise ArtifactError(f"no artifact {unknown[0]} in the store at {store.root}; "
                            "see `gprune ls` for the keys")
    corrupt = 0
    for key in keys:
        try:
            art = store.read(key, hash_limit=None)
        except CorruptArtifactError as err:
            corrupt += 1
            moved = store.quarantine(key) if args.quarantine else None
            print(f"{key:32s} CORRUPT: {err.problem}" + (f" (moved to {moved})" if moved else ""))
            continue
        hashed = all("sha256" in f for f in art.manifest.get("files", {}).values())
        print(f"{key:32s} ok" + ("" if hashed else " (sizes only: no hashes recorded)"))
    print(f"{len(keys)} artifact(s) verified, {corrupt} corrupt", file=sys.stderr)
    return 1 if corrupt else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect API calls are not news
    if args.store:
        os.environ["GPRUNE_STORE"] = os.path.abspath(os.path.expanduser(args.store))
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "stage":
            from gprune import cli_stages

            return cli_stages.run(args)
        return {"ls": cmd_ls, "export": cmd_export, "show": cmd_show, "verify": cmd_verify}[args.command](args)
    except GpruneError as err:
        print(f"gprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gprune: interrupted; finished artifacts are kept, partial ones were discarded",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
