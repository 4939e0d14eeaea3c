"""Benchmark: capture overhead versus the plain dense forward, on the same batches.

Both paths run the decoder body (``model.base_model``, no LM head: capture never needs
logits) with ``use_cache=False`` under inference mode, on identical token batches.
The hooked path does per batch what ``capture_statistics`` does (hooked forward,
then the NaN check; hooks are re-registered per batch, which costs well under a
millisecond). Each batch runs plain and hooked back to back, in alternating order,
so drift in machine load (a shared CPU) hits both alike.

Prints tokens/s for both, peak memory, and as its last line
``capture_throughput_ratio=<hooked/plain>`` (target >= 0.90): the median over batches
of plain time / hooked time for the same batch (robust to load bursts on a shared
machine; the ratio of total times is printed as well). The ``statistics_path=`` line says
which statistics path the hooks took (``compiled`` CPU kernels, or ``torch``: set
``GPRUNE_NATIVE=0`` to measure the pure-torch path).

The gram stage's pass is measured the same way (its own paired loop after the capture's:
plain forward vs forward with ``gprune.maths.gram.GramCapture``'s hooks, float64 Gram
updates of every layer's output-projection inputs). Just before the last line it prints
``gram_throughput_over_flop_limit=<value>`` (target >= 0.85): the measured throughput ratio
(median over batches of plain time / Gram-hooked time, i.e. tokens/s with the Gram hooks
over tokens/s plain) divided by the FLOP limit, forward FLOPs / (forward FLOPs + Gram FLOPs)
per token. Forward FLOPs: ``gprune.maths.evaluate.flops_per_token`` of the decoder body
(2 per weight, attention at the mean causal context, no LM head); Gram FLOPs:
``gprune.maths.gram.gram_flops_per_token``, the multiply-adds of the blocked upper-triangle
updates as implemented (SmolLM2: 0.625 of the full d^2 for the MLP Gram, 0.75 for the
attention one, plus the sums column). A value of 1 means the Gram updates run as fast per
FLOP as the model's forward. On the project's 2-core CPU (AMD EPYC) float64 products run at
about 95 GFLOP/s, near that CPU's float64 peak, against about 130 for the float32 forward, so
about 0.89 is the most the Gram's float64 accumulation allows there; the rest is what the
updates cost beyond their products. The figure moves by up to about +-0.02 from run to run: five
repeats (ten paired batches) is the default.

    python benchmarks/capture.py --model smollm2 --n 8 --seq-len 256 --batch 4 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="model spec (smollm2, tiny:llama, a folder)")
    parser.add_argument("--n", type=int, default=8, help="sequences per pass")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each kind")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)   # the model's GPU (cuda:N), not the current one


def plain_forward(model, input_ids, attention_mask) -> None:
    with torch.inference_mode():
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def hooked_forward(capture, input_ids, attention_mask) -> None:
    """One batch exactly as capture_statistics runs it: hooked forward, then the NaN check."""
    with capture:
        capture.forward(input_ids, attention_mask)
        capture.first_non_finite()


def timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> float:
    args = parse_args(argv)
    from gprune.maths.capture import ActivationCapture
    from gprune.models.loader import load_model, resolve_device, resolve_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ref = resolve_model(args.model)
    model, _, adapter = load_model(ref, device)
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.n, args.seq_len), generator=gen)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids)
    batches = [(input_ids[s:s + args.batch], attention_mask[s:s + args.batch])
               for s in range(0, args.n, args.batch)]
    capture = ActivationCapture(model, adapter)
    plain = lambda b: plain_forward(model, *b)      # noqa: E731
    hooked = lambda b: hooked_forward(capture, *b)  # noqa: E731
    print(f"model={ref.spec} family={ref.family} device={device} threads={torch.get_num_threads()} "
          f"tokens_per_pass={args.n * args.seq_len} batch={args.batch} repeats={args.repeats}")
    peaks = measure_peaks(lambda: [plain(b) for b in batches],
                          lambda: [hooked(b) for b in batches], device)   # also the warm-up
    print(f"statistics_path={'+'.join(sorted(capture.paths_used))}")
    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    for repeat in range(args.repeats):   # same batch back to back, order alternating
        for index, batch in enumerate(batches):
            first_plain = (repeat + index) % 2 == 0
            for name in (("plain", "hooked") if first_plain else ("hooked", "plain")):
                fn = plain if name == "plain" else hooked
                times[name].append(timed(lambda: fn(batch), device))
    batch_tokens = [int(b[1].sum()) for b in batches] * args.repeats
    ratio = report(times, batch_tokens, peaks, capture.workspace.nbytes())
    gram = measure_gram(model, adapter, batches, args, device)
    print(f"gram_throughput_over_flop_limit={gram:.3f}")
    print(f"capture_throughput_ratio={ratio:.3f}")
    return ratio


def gram_forward(gram, input_ids, attention_mask) -> None:
    """One batch as the gram stage runs it: Gram-hooked forward, then the NaN check."""
    with gram:
        gram.forward(input_ids, attention_mask)
        gram.first_non_finite()


def measure_gram(model, adapter, batches, args, device: str) -> float:
    """Paired plain / Gram-hooked passes; print the figures; return the measured throughput
    ratio over its FLOP limit."""
    from gprune.maths.evaluate import flops_per_token
    from gprune.maths.gram import GramCapture, gram_bytes, gram_dims, gram_flops_per_token

    gram = GramCapture(model, adapter)
    plain = lambda b: plain_forward(model, *b)      # noqa: E731
    hooked = lambda b: gram_forward(gram, *b)       # noqa: E731
    timed(lambda: hooked(batches[0]), device)       # warm-up: buffers, BLAS threads
    pairs = []
    for repeat in range(args.repeats):
        for index, batch in enumerate(batches):
            order = (plain, hooked) if (repeat + index) % 2 == 0 else (hooked, plain)
            spent = {fn: timed(lambda: fn(batch), device) for fn in order}
            pairs.append((spent[plain], spent[hooked]))
    tokens = [int(b[1].sum()) for b in batches] * args.repeats
    dims = gram_dims(model, adapter)
    forward = flops_per_token(model, adapter, (args.seq_len + 1) / 2, lm_head_share=0.0)
    extra = gram_flops_per_token(dims, gram.leaf)
    limit = forward / (forward + extra)
    measured = statistics.median(p / h for p, h in pairs)
    rates = {name: statistics.median(n / pair[i] for n, pair in zip(tokens, pairs))
             for i, name in enumerate(("plain", "gram"))}
    print(f"gram_leaf={gram.leaf} gram_memory={gram_bytes(dims, 8) / 2**20:.0f}MiB(float64) "
          f"gram_plain_tokens_per_s={rates['plain']:.1f} gram_tokens_per_s={rates['gram']:.1f}")
    print(f"forward_gflops_per_token={forward / 1e9:.4f} gram_gflops_per_token={extra / 1e9:.4f} "
          f"gram_flop_limit={limit:.3f} gram_throughput_ratio={measured:.3f} (median of "
          f"{', '.join(f'{p / h:.3f}' for p, h in pairs)})")
    return measured / limit


def report(times: dict[str, list[float]], batch_tokens: list[int], peaks: tuple[str, str],
           workspace_bytes: int) -> float:
    """Print per-kind throughput; return the median over batches of plain time / hooked time.

    The median of the paired ratios is robust to load bursts on a shared machine (a
    burst hits one pair, not the statistic); the ratio of total times is printed too.
    """
    for name in ("plain", "hooked"):
        rates = [n / t for n, t in zip(batch_tokens, times[name])]
        print(f"{name}_tokens_per_s={statistics.median(rates):.1f} (median over batches; "
              f"batch times {', '.join(f'{t:.2f}s' for t in times[name])})")
    pair_ratios = [p / h for p, h in zip(times["plain"], times["hooked"])]
    total_ratio = sum(times["plain"]) / sum(times["hooked"])
    print(f"pair_ratios={', '.join(f'{r:.3f}' for r in pair_ratios)} "
          f"total_time_ratio={total_ratio:.3f}")
    print(f"peak_memory_plain={peaks[0]} peak_memory_hooked={peaks[1]} "
          f"capture_workspace={workspace_bytes / 2**20:.1f}MiB")
    return statistics.median(pair_ratios)


def measure_peaks(plain, hooked, device: str) -> tuple[str, str]:
    """Peak memory of one pass of each (CUDA: allocated bytes; CPU: process peak RSS)."""
    if device.startswith("cuda"):
        peaks = []
        for fn in (plain, hooked):
            torch.cuda.reset_peak_memory_stats(device)
            timed(fn, device)
            peaks.append(f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}MiB")
        return peaks[0], peaks[1]
    timed(plain, device)
    after_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed(hooked, device)
    after_hooked = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"{after_plain:.0f}MiB(rss)", f"{after_hooked:.0f}MiB(rss)"


if __name__ == "__main__":
    main()
