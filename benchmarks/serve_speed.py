"""Dense vs pruned in llama.cpp: prompt-processing and generation tokens/s, and perplexity.

    python benchmarks/serve_speed.py --pruned <surgery key> [--dense smollm2] [--store DIR]
        [--outtypes f16 q8_0] [--prompt-tokens 256] [--gen-tokens 32] [--repeats 5]

Both models are exported with gprune's ``export`` stage (cached in the store) in each
``--outtypes``, loaded in llama.cpp (llama-cpp-python) on the same machine, and timed
interleaved (order rotating each repeat, one untimed warm-up each): prefill of a
``--prompt-tokens`` prompt (logits of the last position only) and greedy generation of
``--gen-tokens`` tokens after it; medians are reported. The theoretical speedup is the
dense / pruned FLOPs per prefill token of the transformers checkpoints (as in
``benchmarks/speed.py``: linear layers, attention scores at the causal mean context, the
LM head once per prompt). The perplexity check runs every export of both models over
``--ppl-windows`` held-out windows of ``--ppl-source`` and the transformers checkpoints over
the same token ids; the tokenizer check counts held-out documents that llama.cpp and
transformers split into the same tokens. Each export's file size is printed.
Last line: ``llamacpp_prefill_speedup_over_theoretical=<f16 measured / theoretical>``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.store import ArtifactStore  # noqa: E402
from gprune.configs.export import ExportConfig  # noqa: E402
from gprune.maths.evaluate import flops_per_token  # noqa: E402
from tasks.checkpoint import resolve_checkpoint  # noqa: E402
from tasks.export import gguf_name, run_export  # noqa: E402


def load_gguf(path: Path, threads: int, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                 n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                 verbose=False)


def time_prefill(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def time_generation(llm, ids: list[int], steps: int) -> float:
    """Greedy generation of ``steps`` tokens after the prompt; only the steps are timed."""
    llm.reset()
    llm.eval(ids)
    start = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return time.perf_counter() - start


def measure(models: dict, ids: list[int], steps: int, repeats: int) -> dict:
    """Median prefill and generation tokens/s per model, interleaved, order rotating."""
    names = list(models)
    for name in names:
        time_prefill(models[name], ids)
        time_generation(models[name], ids, 2)
    prefill = {n: [] for n in names}
    gen = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            prefill[name].append(len(ids) / time_prefill(models[name], ids))
            gen[name].append(steps / time_generation(models[name], ids, steps))
    return {n: (statistics.median(prefill[n]), statistics.median(gen[n])) for n in names}


def exports(store: ArtifactStore, model: str, outtypes: list[str]) -> dict[str, Path]:
    out = {}
    for outtype in outtypes:
        config = ExportConfig(outtype=outtype)
        key = run_export(config, store, model)
        out[outtype] = store.read(key, stage="export", hash_limit=0).file(gguf_name(config))
    return out


def prefill_flops(folder: Path, prompt: int) -> float:
    from gprune.models.loader import load_model

    model, _, adapter = load_model(str(folder))
    return flops_per_token(model, adapter, (prompt + 1) / 2, lm_head_share=1 / prompt)


def heldout_windows(store: ArtifactStore, folder: Path, source: str, windows: int,
                    seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from gprune.configs.corpus import CorpusConfig
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split, run_corpus

    corpus = run_corpus(CorpusConfig(source=source, seed=0), store)
    docs = read_split(store, corpus, "heldout")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids, mask = sample_sequences(docs, tokenizer, windows, seq_len, seed=0)
    return [row.tolist() for row, m in zip(ids, mask) if bool(m.all())]  # full windows only


def nll_llama_cpp(path: Path, windows: list[list[int]], threads: int) -> tuple[float, int]:
    llm = load_gguf(path, threads, len(windows[0]), logits_all=True)
    total, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return total, count


@torch.inference_mode()
def nll_transformers(folder: Path, windows: list[list[int]]) -> tuple[float, int]:
    from gprune.models.loader import load_model

    model, _, _ = load_model(str(folder))
    total, count = 0.0, 0
    for ids in windows:
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]),
                                                   reduction="sum").item()
        count += len(ids) - 1
    return total, count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pruned", required=True, help="surgery artifact key")
    parser.add_argument("--dense", default="smollm2", help="the dense model spec")
    parser.add_argument("--store", default=None)
    parser.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-source", default="wikipedia")
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    return parser.parse_args(argv)


def speed_lines(args, files: dict, theoretical: float) -> dict[str, float]:
    """Time every export; print a line per model and outtype; return outtype -> ratio."""
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    models = {(who, t): load_gguf(path, args.threads, n_ctx)
              for who, per_type in files.items() for t, path in per_type.items()}
    ids = torch.randint(0, models[("dense", args.outtypes[0])].n_vocab(), (args.prompt_tokens,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    speeds = measure(models, ids, args.gen_tokens, args.repeats)
    ratios = {}
    for (who, outtype), (pf, gen) in speeds.items():
        line = (f"{who} {outtype}: file_bytes={files[who][outtype].stat().st_size} "
                f"prefill_tok_s={pf:.1f} gen_tok_s={gen:.1f}")
        if who == "pruned":
            dense_pf, dense_gen = speeds[("dense", outtype)]
            ratios[outtype] = (pf / dense_pf) / theoretical
            line += (f" prefill_speedup={pf / dense_pf:.3f} gen_speedup={gen / dense_gen:.3f}"
                     f" theoretical={theoretical:.3f}"
                     f" prefill_speedup_over_theoretical={ratios[outtype]:.3f}")
        print(line, flush=True)
    return ratios


def perplexity_lines(args, store: ArtifactStore, who: str, folder: Path, files: dict) -> None:
    """Held-out perplexity of one model in transformers and of each of its exports."""
    windows = heldout_windows(store, folder, args.ppl_source, args.ppl_windows,
                              args.ppl_seq_len)
    total, count = nll_transformers(folder, windows)
    ref = math.exp(total / count)
    print(f"{who} transformers: {args.ppl_source} heldout ppl={ref:.4f} "
          f"({len(windows)} x {args.ppl_seq_len} tokens)", flush=True)
    for outtype, path in files.items():
        total, count = nll_llama_cpp(path, windows, args.threads)
        ppl = math.exp(total / count)
        print(f"{who} llama.cpp {outtype}: ppl={ppl:.4f} relative_to_transformers="
              f"{ppl / ref - 1:+.4%}", flush=True)


def tokenizer_line(args, store: ArtifactStore, folder: Path, path: Path) -> None:
    """Whether llama.cpp splits held-out text into the same tokens as transformers."""
    from transformers import AutoTokenizer

    from gprune.configs.corpus import CorpusConfig
    from tasks.corpus import read_split, run_corpus

    docs = read_split(store, run_corpus(CorpusConfig(source=args.ppl_source, seed=0), store),
                      "heldout")[:20]
    hf = AutoTokenizer.from_pretrained(folder)
    llm = load_gguf(path, args.threads, 64)
    same = sum(hf(d, add_special_tokens=False)["input_ids"] ==
               llm.tokenize(d.encode(), add_bos=False, special=True) for d in docs)
    print(f"tokenizer: {same} of {len(docs)} held-out {args.ppl_source} documents split into "
          "the same tokens by llama.cpp and transformers", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    store = ArtifactStore(args.store)
    dense_folder = resolve_checkpoint(store, args.dense).path
    pruned_folder = resolve_checkpoint(store, args.pruned).path
    files = {"dense": exports(store, args.dense, args.outtypes),
             "pruned": exports(store, args.pruned, args.outtypes)}
    theoretical = (prefill_flops(dense_folder, args.prompt_tokens)
                   / prefill_flops(pruned_folder, args.prompt_tokens))
    print(f"dense={args.dense} pruned={args.pruned} threads={args.threads} "
          f"prompt_tokens={args.prompt_tokens} gen_tokens={args.gen_tokens} "
          f"repeats={args.repeats}", flush=True)
    ratios = speed_lines(args, files, theoretical)
    perplexity_lines(args, store, "pruned", pruned_folder, files["pruned"])
    perplexity_lines(args, store, "dense", dense_folder, files["dense"])
    tokenizer_line(args, store, pruned_folder, next(iter(files["pruned"].values())))
    headline = ratios.get("f16", next(iter(ratios.values())))
    print(f"llamacpp_prefill_speedup_over_theoretical={headline:.3f}")


if __name__ == "__main__":
    main()
