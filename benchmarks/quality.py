"""Benchmark: GPrune-LLM against FLAP, Wanda-sp and magnitude on SmolLM2, with ablations.

Every method runs through the ``gprune`` flow on the same store, so one calibration
capture per source serves all of them and the dense model is evaluated once:

- main:      gprune, flap, wanda_sp, magnitude_sp, calibrated on 4 sources pooled,
             at every sparsity of ``--sparsities``;
- single:    flap calibrated on one general-text source (the published protocol) at
             every sparsity, and gprune on that one source (no gate: it needs >= 2);
- ablations: gprune without partition, without gate, and with the uniform, FLAP and
             per-target learned allocators, at ``--ablation-sparsities``.

Evaluation: held-out perplexity on every source (the 4 calibration domains and the
never-calibrated docs + math), MMLU and Social IQa subsets (standard errors from
lm-eval). One report over all runs (table + plots) is written to the store and copied
to ``--out`` with ``quality_summary.csv``. The last line compares gprune with the best
baseline on the never-calibrated perplexity at the highest sparsity.

    python benchmarks/quality.py                      # about an hour on a 2-core CPU
    python benchmarks/quality.py --mc-limit 500 --eval-tokens 16384 --device cuda
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                      ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALIBRATION = ["wikipedia", "web", "code", "news"]
HELD_OUT = ["docs", "math"]   # never a calibration source of any run
BASELINES = ("flap", "wanda_sp", "magnitude_sp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--ablation-sparsities", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--single-source", default="wikipedia",
                        help="the one general-text source of the single-source runs")
    parser.add_argument("--capture-sequences", type=int, default=32)
    parser.add_argument("--capture-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per source")
    parser.add_argument("--mc-limit", type=int, default=100, help="examples per MC task")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store", default=None, help="artifact store (default: gprune's)")
    parser.add_argument("--groups", nargs="+", default=["main", "single", "ablations"],
                        choices=["main", "single", "ablations"])
    parser.add_argument("--out", default="benchmarks/results/quality",
                        help="folder for the summary CSV, report and plots")
    return parser.parse_args(argv)


def groups(args) -> dict[str, dict]:
    """Flow parameters of each group of runs (everything else is shared)."""
    return {
        "main": dict(sources=CALIBRATION, sparsities=args.sparsities,
                     methods=["gprune", *BASELINES]),
        "single": dict(sources=[args.single_source], sparsities=args.sparsities,
                       methods=["flap", "gprune:gate=false"]),
        "ablations": dict(sources=CALIBRATION, sparsities=args.ablation_sparsities,
                          methods=["gprune:k=1", "gprune:gate=false",
                                   *(f"gprune:allocator={a}"
                                     for a in ("uniform", "flap", "learned"))]),
    }


def run_group(args, name: str, params: dict) -> list[str]:
    from flows.gprune_flow import run_pipeline
    from gprune.configs.pipeline import PipelineConfig

    config = PipelineConfig(
        model=args.model, eval_sources=CALIBRATION + HELD_OUT,
        capture_sequences=args.capture_sequences, capture_seq_len=args.capture_seq_len,
        eval_tokens=args.eval_tokens, mc_limit=args.mc_limit, speed=False, device=args.device,
        **params)
    started = time.perf_counter()
    result = run_pipeline(config, store=args.store)
    print(f"group {name}: {len(result['evals'])} evaluated models in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return [key for keys in result["evals"].values() for key in keys.values()]


def run_summary(table) -> "pd.DataFrame":  # noqa: F821
    """Per run: geo-mean ppl over calibration domains and held-out domains (with a
    delta-method standard error), MC accuracies with their standard errors."""
    import pandas as pd

    from gprune.report.table import geo_mean

    rows = []
    for _run, run in table.groupby("run", sort=False):
        first, ppl = run.iloc[0], run[run["kind"] == "ppl"].set_index("name")
        row = {"method": first["label"], "sparsity": first["target_sparsity"]}
        for tag, names in (("calib", CALIBRATION), ("heldout", HELD_OUT)):
            hit = ppl.loc[[n for n in names if n in ppl.index]]
            row[f"ppl_{tag}"] = geo_mean(hit["value"])
            rel = ((hit["stderr"] / hit["value"]) ** 2).sum() ** 0.5 / len(hit)
            row[f"ppl_{tag}_se"] = row[f"ppl_{tag}"] * rel
        for _i, mc in run[run["kind"] == "mc"].iterrows():
            row[mc["name"]] = mc["value"]
            row[f"{mc['name']}_se"] = mc["stderr"]
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["sparsity", "method"]).reset_index(drop=True)


def headline(summary) -> str:
    top = summary["sparsity"].max()
    at_top = summary[summary["sparsity"] == top].set_index("method")
    baselines = at_top[at_top.index.map(lambda m: m.split(" ")[0] in BASELINES)]
    best = baselines["ppl_heldout"].idxmin()
    ratio = at_top.loc["gprune", "ppl_heldout"] / baselines.loc[best, "ppl_heldout"]
    print(f"at sparsity {top:g}: gprune held-out ppl {at_top.loc['gprune', 'ppl_heldout']:.2f} "
          f"vs best baseline {best} {baselines.loc[best, 'ppl_heldout']:.2f}")
    return f"heldout_ppl_gprune_over_best_baseline_at_{int(round(top * 100))}={ratio:.3f}"


def main(argv=None) -> int:
    import pandas as pd

    from artifacts.store import ArtifactStore
    from gprune.configs.report import ReportConfig
    from tasks.report import run_report

    args = parse_args(argv)
    started = time.perf_counter()
    eval_keys: list[str] = []
    for name, params in groups(args).items():
        if name in args.groups:
            eval_keys += run_group(args, name, params)
    store = ArtifactStore(args.store)
    report = store.path(run_report(ReportConfig(title="gprune quality benchmark"), store,
                                   eval_keys))
    table = pd.read_parquet(report / "results.parquet")
    summary = run_summary(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "quality_summary.csv", index=False, float_format="%.4g")
    for name in ("report.md", "summary.csv", *(p.name for p in report.glob("*.png"))):
        shutil.copy(report / name, out / name)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.round(3).to_string(index=False))
    print(f"report: {report}; copied to {out}; total {time.perf_counter() - started:.0f}s")
    print(headline(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
