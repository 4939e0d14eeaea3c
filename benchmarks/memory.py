"""Benchmark: peak memory and throughput of the layer-streamed capture (with Grams) vs in memory.

For each model (``--models``, default ``smollm2``; any spec: ``gemma3`` for Gemma-3-270m
where that spec exists, ``tiny:llama``, a folder), each mode runs in a fresh subprocess on
the same random token batches (N x T, seed 0):

- ``full``: ``load_model`` then ``capture_with_grams`` (one forward per batch through the
  whole model; every layer's float64 Grams in memory), as the capture stage runs in memory;
- ``streamed``: ``StreamedModel`` then ``streamed_statistics(grams=True)`` (one decoder
  layer's weights at a time; hidden states on the host; each finished layer's Grams written
  to a temporary file), as the capture stage runs with ``stream=on``.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (device memory; the counter is
reset after the imports); on a CPU the process's peak resident set (``ru_maxrss``) above
its resident set after the imports and the token batches (``psutil``), i.e. what loading
the model and the pass added. Both modes include loading the weights. Time: loading, and
the pass itself; the throughput ratio is streamed tokens/s over in-memory tokens/s of the
pass (``streamed_throughput_ratio``; with loading: ``..._with_load``). The streamed child
also prints its per-layer figures (weights bytes, seconds per layer, hidden-state bytes)
that docs/SCALE.md extrapolates from.

With ``--stage path`` the pair is the learned path's training instead (``learn_path``,
``--steps`` Adam steps on N x T tokens in batches of ``--batch``, random channel scores):
``full`` loads the model, ``streamed`` runs ``gprune.maths.streamed_learning`` on a
``StreamedModel``; the last line is then ``path_streamed_peak_over_full=<ratio>`` and the
throughput ratio is of the training (teachers included).

With ``--repeats R`` the pair runs R times, the order alternated (a shared machine's load
drifts), and the ratios are medians over the pairs. The line before the last gives the
smallest throughput ratio over the models; the last line, ``streamed_peak_over_full=<ratio>``
(target <= 0.35), the largest peak-memory ratio.

    python benchmarks/memory.py --models smollm2 gemma3 --n 8 --seq-len 256 --batch 4
    python benchmarks/memory.py --stage path --models smollm2 --n 4 --seq-len 128 --batch 2 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2"],
                        help="model specs (smollm2, gemma3, tiny:llama, a folder)")
    parser.add_argument("--n", type=int, default=8, help="sequences per pass")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs of runs (order alternated); medians are reported")
    parser.add_argument("--stage", choices=["capture", "path"], default="capture",
                        help="what is measured: the capture with Grams, or the learned path")
    parser.add_argument("--steps", type=int, default=6, help="--stage path: Adam steps")
    parser.add_argument("--child", choices=["full", "streamed"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One mode on one model, in this (fresh) process; returns its measurements."""
    import psutil
    import torch
    from transformers import AutoConfig

    from gprune.maths.calibrate import capture_with_grams, streamed_statistics
    from gprune.models.loader import load_model, resolve_device, resolve_model
    from gprune.models.streamed import StreamedModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ref = resolve_model(args.models[0])
    vocab = AutoConfig.from_pretrained(ref.path).get_text_config().vocab_size
    ids = torch.randint(0, vocab, (args.n, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    warm_up_imports(ref.path)
    baseline = psutil.Process().memory_info().rss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.stage == "path":
        return {**learning_child(args, ref, device, ids, mask, start),
                "peak_bytes": int(_peak(device, baseline))}
    out: dict = {}
    if args.child == "full":
        model, _, adapter = load_model(ref, device)
        loaded = time.perf_counter()
        capture, grams = capture_with_grams(model, adapter, ids, mask, args.batch,
                                            progress=False)
    else:
        streamed = StreamedModel(ref.path, device, head=False)   # as the capture stage
        loaded = time.perf_counter()
        capture, grams = streamed_statistics(streamed, ids, mask, args.batch, grams=True)
        out.update(layers=len(streamed.layers), layer_bytes=streamed.layer_bytes(0),
                   resident_bytes=streamed.resident_bytes(),
                   hidden_bytes=args.n * args.seq_len * 4
                   * streamed.model.config.get_text_config().hidden_size)
    done = time.perf_counter()
    peak = _peak(device, baseline)
    assert capture.tokens == grams.tokens == args.n * args.seq_len
    return {**out, "mode": args.child, "device": device, "peak_bytes": int(peak),
            "load_s": loaded - start, "pass_s": done - loaded, "tokens": capture.tokens}


def _peak(device: str, baseline: int) -> int:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def learning_child(args, ref, device: str, ids, mask, start: float) -> dict:
    """The learned path's training in one mode (``--stage path``)."""
    import torch

    from gprune.maths.learned_path import PathSettings, learn_path
    from gprune.models.loader import load_model
    from gprune.models.streamed import StreamedModel

    if args.child == "full":
        model, _, adapter = load_model(ref, device)
    else:
        model = StreamedModel(ref.path, device)                 # with its head: KL at the end
        adapter = model.adapter
    loaded = time.perf_counter()
    shape = adapter.shape(model.config if args.child == "full" else model.model.config)
    batches = [(ids[s:s + args.batch], mask[s:s + args.batch])
               for s in range(0, args.n, args.batch)]
    torch.manual_seed(0)
    learn_path(model, adapter, shape, random_scores(shape), batches,
               PathSettings(steps=args.steps, grid=(0.2, 0.4)))
    return {"mode": args.child, "device": device, "load_s": loaded - start,
            "pass_s": time.perf_counter() - loaded, "tokens": args.n * args.seq_len}


def random_scores(shape):
    """Channel and head scores in [0, 1) (seed 0), one module per layer: what the path's
    masks need; the learning's cost does not depend on the values."""
    import pandas as pd
    import torch

    gen, rows = torch.Generator().manual_seed(0), []
    for layer in range(shape.num_layers):
        for kind, count in (("mlp", shape.intermediate), ("attn", shape.heads)):
            rows += [{"layer": layer, "kind": kind, "module": 0, "unit": unit, "score": float(v)}
                     for unit, v in enumerate(torch.rand(count, generator=gen))]
    return pd.DataFrame(rows)


def warm_up_imports(path) -> None:
    """Import what both modes import lazily (the family's modeling code, accelerate, the
    compiled capture kernels), so the baseline holds the code and the peak only data."""
    import accelerate  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from gprune.maths.native import capture_kernels

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    capture_kernels()


def run_child(args: argparse.Namespace, model: str, mode: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, "--models", model,
            "--n", str(args.n), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
            "--device", args.device, "--threads", str(args.threads), "--stage", args.stage,
            "--steps", str(args.steps)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model} {mode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])


def measure_pair(args: argparse.Namespace, model: str, flip: bool) -> tuple[dict, dict]:
    """(full, streamed) runs of one model, streamed first when ``flip``."""
    if flip:
        streamed = run_child(args, model, "streamed")
        return run_child(args, model, "full"), streamed
    return run_child(args, model, "full"), run_child(args, model, "streamed")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    ratios, throughputs = [], []
    for model in args.models:
        try:
            pairs = [measure_pair(args, model, flip=r % 2 == 1) for r in range(args.repeats)]
        except RuntimeError as err:
            print(f"model={model} skipped: {err}")
            continue
        for full, streamed in pairs:
            for run in (full, streamed):
                print(f"model={model} mode={run['mode']} device={run['device']} "
                      f"peak_mb={run['peak_bytes'] / 1e6:.1f} load_s={run['load_s']:.2f} "
                      f"pass_s={run['pass_s']:.2f} "
                      f"tokens_per_s={run['tokens'] / run['pass_s']:.1f}")
        if args.stage == "capture":
            print_per_layer(model, pairs)
        throughput = statistics.median(f["pass_s"] / s["pass_s"] for f, s in pairs)
        with_load = statistics.median((f["pass_s"] + f["load_s"]) / (s["pass_s"] + s["load_s"])
                                      for f, s in pairs)
        ratio = statistics.median(s["peak_bytes"] / f["peak_bytes"] for f, s in pairs)
        print(f"model={model} streamed_throughput_ratio={throughput:.3f} "
              f"streamed_throughput_ratio_with_load={with_load:.3f} "
              f"streamed_peak_over_full={ratio:.3f}")
        ratios.append(ratio)
        throughputs.append(throughput)
    if not ratios:
        print("no model could be measured")
        return 1
    prefix = "" if args.stage == "capture" else f"{args.stage}_"
    print(f"{prefix}streamed_throughput_ratio={min(throughputs):.3f}")
    print(f"{prefix}streamed_peak_over_full={max(ratios):.3f}")
    return 0


def print_per_layer(model: str, pairs: list[tuple[dict, dict]]) -> None:
    """The streamed capture's per-layer figures (docs/SCALE.md extrapolates from them)."""
    streamed = pairs[0][1]
    per_layer = statistics.median(s["pass_s"] for _, s in pairs) / streamed["layers"]
    print(f"model={model} per_layer: weights_mb={streamed['layer_bytes'] / 1e6:.1f} "
          f"resident_mb={streamed['resident_bytes'] / 1e6:.1f} "
          f"hidden_states_mb={streamed['hidden_bytes'] / 1e6:.1f} "
          f"seconds_per_layer={per_layer:.3f} "
          f"seconds_per_layer_per_1k_tokens={1000 * per_layer / streamed['tokens']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
