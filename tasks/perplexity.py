"""Stage ``perplexity``: held-out perplexity per corpus source, plus size and FLOPs.

``model``: a surgery key or a dense model spec (``tasks.checkpoint``). The key depends
on the checkpoint's identity, the corpus keys and the ``PerplexityConfig``. Writes
``results.parquet`` (schema in ``gprune.eval.results``): one ``ppl`` row per corpus
source (tagged ``in`` when the source calibrated the checkpoint, else ``ood``), then the
``size`` rows (parameter counts, bytes) and ``flops_per_token``. Size and FLOPs live
here because they are cheap and FLOPs per token depend on the perplexity window (the
forward pass is counted at the mean causal context of one window); the manifest's extra
holds the run metadata, ``seq_len_used`` (``seq_len`` cut to the model's context) and
``streamed`` (whether the checkpoint ran one decoder layer at a time: ``PerplexityConfig.stream``).
"""
from __future__ import annotations

import logging
import time

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.perplexity import PerplexityConfig
from gprune.eval.results import record
from gprune.maths import evaluate as em
from tasks.base import run_stage, stage_spec
from gprune.maths.streaming import streamed_window_nll
from gprune.models.streamed import StreamedModel
from tasks.checkpoint import (load_checkpoint, progress_bars, resolve_checkpoint, window_length,
                              write_results)

log = logging.getLogger("gprune")
STAGE = "perplexity"


def run_perplexity(config: PerplexityConfig, store: ArtifactStore, model: str,
                   corpus_keys: dict[str, str], force: bool = False) -> str:
    """Measure a checkpoint's perplexity, size and FLOPs; return the artifact key."""
    checkpoint = resolve_checkpoint(store, model)
    inputs = {"model": checkpoint.identity, "corpora": dict(sorted(corpus_keys.items()))}
    spec = stage_spec(checkpoint.identity, inputs, config.params())

    def build(pending: PendingArtifact) -> None:
        start = time.perf_counter()
        loaded, tokenizer, adapter, _ = load_checkpoint(
            config, checkpoint, config.stream, config.batch_size * config.seq_len)
        streamed = isinstance(loaded, StreamedModel)
        net = loaded.model if streamed else loaded
        seq_len = window_length(STAGE, config.seq_len, net)
        rows = [*ppl_rows(config, store, corpus_keys, loaded, tokenizer, seq_len,
                          checkpoint.extra["calibration_sources"]),
                *size_rows(net, adapter, seq_len)]
        write_results(pending, rows, checkpoint, seq_len_used=seq_len, streamed=streamed)
        log.info("perplexity: %s (%s) done in %.1f s", checkpoint.extra["method"],
                 checkpoint.identity, time.perf_counter() - start)

    return run_stage(store, STAGE, spec, build, force=force)


def ppl_rows(config: PerplexityConfig, store: ArtifactStore, corpus_keys: dict[str, str],
             model, tokenizer, seq_len: int, calibration: list[str]) -> list[dict]:
    """One ``ppl`` row per corpus source, ``ceil(ppl_tokens / seq_len)`` windows each."""
    from gprune.data.corpus import sample_sequences
    from tasks.corpus import read_split

    rows = []
    n_windows = -(-config.ppl_tokens // seq_len)
    for source, key in sorted(corpus_keys.items()):
        texts = read_split(store, key, "heldout")
        ids, mask = sample_sequences(texts, tokenizer, n_windows, seq_len, config.seed)
        start = time.perf_counter()  # ids, mask: (windows, seq_len)
        if isinstance(model, StreamedModel):
            result = em.perplexity_from_nll(*streamed_window_nll(model, ids, mask,
                                                                 config.batch_size))
        else:
            result = em.perplexity(model, ids, mask, config.batch_size,
                                   progress=progress_bars())
        log.info("perplexity: %s (%d windows x %d tokens): %.2f in %.1f s", source,
                 *ids.shape, result.ppl, time.perf_counter() - start)
        rows.append(record("ppl", source, "ppl", result.ppl, result.stderr, result.tokens,
                           calibration_sources=calibration))
    return rows


def size_rows(model, adapter, seq_len: int) -> list[dict]:
    """Parameter counts and bytes, and FLOPs per token at a window's mean causal context."""
    counts = em.parameter_counts(model, adapter)
    rows = [record("size", name, "bytes" if name == "bytes" else "count", value)
            for name, value in counts.items()]
    flops = em.flops_per_token(model, adapter, context=(seq_len + 1) / 2)
    return rows + [record("size", "flops_per_token", "flops", flops)]
