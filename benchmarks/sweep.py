"""Benchmark: a sparsity sweep costs little more than one target (stages 1-4 are shared).

Runs the ``gprune`` flow twice in this process, evaluation off, each cold in its own
fresh temporary artifact store: once with one target, once with five. A warm-up flow run
on a tiny model (Prefect's ephemeral API, imports, first use of every stage) and the
model conversion come first and are excluded from both timings. Prints both wall times, the seconds per stage (from the artifact
manifests), and as its last line ``sweep5_over_single=<five-target / one-target>``
(target <= 1.3).

    python benchmarks/sweep.py                       # SmolLM2, the pipeline's defaults
    python benchmarks/sweep.py --method gprune --allocator learned   # per-target learning

Defaults are the pipeline's (``make run``): 4 sources x 8 x 512 capture tokens, gprune
with its default (learned path, learned once and shared by every target; per target the
allocate stage's KL check and the lsq refit at surgery). The shared part grows with
the capture budget (sources x sequences x seq-len), the per-target part with the
allocator (``--allocator learned`` learns once per target) and surgery. About 7 minutes
on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                      ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model spec (smollm2, tiny:llama, ...)")
    parser.add_argument("--sources", nargs="+", default=["wikipedia", "web", "code", "news"],
                        help="calibration sources (>= 2 for the gprune gate)")
    parser.add_argument("--sequences", type=int, default=8, help="capture sequences per source")
    parser.add_argument("--seq-len", type=int, default=512, help="capture tokens per sequence")
    parser.add_argument("--method", default="gprune", help="gprune | flap | wanda_sp | magnitude_sp")
    parser.add_argument("--allocator", default=None,
                        help="override the method's allocator: learned_path | learned | uniform | flap")
    parser.add_argument("--allocator-steps", type=int, default=None,
                        help="learned-allocator steps (default: the allocator's)")
    parser.add_argument("--targets", nargs=5, type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                        help="the five target sparsities of the sweep")
    parser.add_argument("--single", type=float, default=0.3, help="the one-target run's target")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--runner", default=None, help="task runner: thread (default) | dask")
    parser.add_argument("--warmup-model", default="tiny:llama",
                        help="tiny model of the warm-up run (excluded from the timings)")
    parser.add_argument("--keep", action="store_true", help="keep the two temporary stores")
    return parser.parse_args(argv)


def method(args) -> dict:
    return {"name": args.method, **({"allocator": args.allocator} if args.allocator else {})}


def stage_seconds(store: Path) -> dict[str, float]:
    """Seconds spent building each stage's artifacts (from the manifests)."""
    seconds: dict[str, float] = defaultdict(float)
    for manifest in store.glob("*/*/manifest.json"):
        data = json.loads(manifest.read_text())
        seconds[data["stage"]] += float(data.get("seconds", 0.0))
    return dict(seconds)


def warm_up(runnable, args, root: Path) -> None:
    """Outside the timings: start Prefect's local API, convert/fingerprint the model, and
    run every stage once on a tiny model (imports and first-use costs of each stage)."""
    from gprune.models.loader import resolve_model

    resolve_model(args.model)
    runnable(config=dict(model=args.warmup_model, sources=args.sources,
                         eval_sources=args.sources, sparsities=[args.single],
                         methods=[method(args)], capture_sequences=2, capture_seq_len=16,
                         allocator_steps=1, evaluate=False, device=args.device),
             store=str(root))


def timed_run(runnable, args, sparsities: list[float], root: Path) -> float:
    config = dict(model=args.model, sources=args.sources, eval_sources=args.sources,
                  sparsities=sparsities, methods=[method(args)],
                  capture_sequences=args.sequences, capture_seq_len=args.seq_len,
                  allocator_steps=args.allocator_steps, evaluate=False, device=args.device)
    started = time.perf_counter()
    runnable(config=config, store=str(root))
    return time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    from flows.gprune_flow import gprune_flow
    from flows.runners import make_task_runner

    runnable = gprune_flow.with_options(task_runner=make_task_runner(args.runner))
    with tempfile.TemporaryDirectory(prefix="gprune-sweep-") as tmp:
        warm_up(runnable, args, Path(tmp) / "warmup")
        roots = {"single": Path(tmp) / "single", "sweep5": Path(tmp) / "sweep5"}
        single = timed_run(runnable, args, [args.single], roots["single"])
        five = timed_run(runnable, args, list(args.targets), roots["sweep5"])
        for name, root in roots.items():
            parts = " ".join(f"{k}={v:.1f}" for k, v in sorted(stage_seconds(root).items()))
            print(f"{name}_stage_seconds: {parts}")
        per_target = stage_seconds(roots["sweep5"]).get("surgery", 0.0) / len(args.targets)
        print(f"surgery_with_refit_seconds_per_target={per_target:.1f}")
        if args.keep:
            keep = Path(tempfile.mkdtemp(prefix="gprune-sweep-kept-"))
            for root in roots.values():
                root.rename(keep / root.name)
            print(f"stores kept in {keep}")
    print(f"settings: model={args.model} sources={','.join(args.sources)} "
          f"capture={args.sequences}x{args.seq_len} method={method(args)} "
          f"allocator_steps={args.allocator_steps} targets={args.targets} single={args.single}")
    print(f"single_target_s={single:.1f}")
    print(f"five_targets_s={five:.1f}")
    print(f"sweep5_over_single={five / single:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
