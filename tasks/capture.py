"""Stage 1 task: (model, corpus artifact) -> per-channel activation statistics of one source.

Files of a capture artifact:

``channels.parquet``, one row per (layer, kind, channel):
    layer int32, kind string ("mlp" | "attn"), channel int32, count int64,
    sum float64, sumsq float64, sum_abs float64, active int64
  ``mlp`` channels are the inputs of the MLP output projection (one per MLP unit);
  ``attn`` channels are the inputs of the attention output projection, query head h
  owning channels h*head_dim .. (h+1)*head_dim - 1. ``count`` is the number of real
  (non-padding) tokens; ``active`` counts the tokens where |x_c| > tau_act * RMS_t,
  RMS_t being the root mean square over all channels of that same input vector at
  that token.
``layers.parquet``, one row per decoder layer:
    layer int32, cosine_sum float64, cosine_count int64
  the sum over real tokens of cos(hidden state entering the layer, leaving it).

Manifest extra: source, tokens (real), requested_tokens, family, model_path, device,
statistics_path ("compiled": the fused CPU kernels of gprune.maths.native; "torch": the
pure-torch reference path, used on GPUs, for non-float32 models and without a C compiler),
streamed (whether the pass ran one decoder layer at a time: ``CaptureConfig.stream``).

With a companion gram config (``run_capture(..., gram=...)``, what the flow passes when a
method needs Grams) the same forward pass also stores that source's gram artifact.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.store import ArtifactStore
from gprune.configs.capture import CaptureConfig
from gprune.configs.gram import GramConfig
from gprune.errors import ConfigError, GpruneError
from gprune.maths.calibrate import capture_with_grams, streamed_statistics
from gprune.maths.capture import capture_statistics
from gprune.models.loader import resolve_device, resolve_model
from gprune.models.streamed import open_model
from tasks.base import run_stage, stage_spec
from tasks.gram import gram_stored, store_grams

log = logging.getLogger("gprune")

CHANNELS_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("kind", pa.string()), ("channel", pa.int32()),
    ("count", pa.int64()), ("sum", pa.float64()), ("sumsq", pa.float64()),
    ("sum_abs", pa.float64()), ("active", pa.int64())])
LAYERS_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("cosine_sum", pa.float64()), ("cosine_count", pa.int64())])


class ShortSourceWarning(UserWarning):
    """A calibration source had fewer tokens than requested."""


def run_capture(config: CaptureConfig, store: ArtifactStore, model: str, corpus_key: str,
                force: bool = False, gram: Optional[GramConfig] = None) -> str:
    """Capture one source's activation statistics; return the capture artifact key.

    ``gram`` (the companion config, ``GramConfig.from_capture``): when the capture is built
    and that gram artifact is not stored yet, the same forward pass accumulates the Grams
    too and stores them as the gram stage would (same key), saving the gram stage's pass.
    """
    ref = resolve_model(model)
    spec = stage_spec(ref.fingerprint, {"corpus": corpus_key}, config.params())
    if gram is not None:
        check_companion(gram, config)

    def build(out) -> None:
        from gprune.data.corpus import sample_sequences
        from tasks.corpus import read_split

        texts = read_split(store, corpus_key, "calibration")
        device = resolve_device(config.device)
        dense, tokenizer, adapter, streamed = open_model(
            ref.path, device, config.stream, config.batch_size * config.seq_len,
            head=False)   # calibration needs no logits: no full token embedding either
        input_ids, attention_mask = sample_sequences(texts, tokenizer, config.n_sequences,
                                                     config.seq_len, config.seed)
        tokens = check_token_count(int(attention_mask.sum()), config)
        args = (dense, adapter, input_ids, attention_mask, config.batch_size, config.tau_act)
        joint = gram is not None and not gram_stored(store, gram, ref, corpus_key)
        if streamed is not None:
            result, grams = streamed_statistics(streamed, *args[2:], label=config.source,
                                                grams=joint)
        elif joint:
            result, grams = capture_with_grams(*args, label=config.source)
        else:
            result = capture_statistics(*args, label=config.source)
        if joint:
            store_grams(store, grams, gram, ref, corpus_key, device, dense, adapter)
        assert result.tokens == tokens, (result.tokens, tokens)
        write_table(result.channels, CHANNELS_SCHEMA, out.file("channels.parquet"))
        write_table(result.layers, LAYERS_SCHEMA, out.file("layers.parquet"))
        out.extra.update({"source": config.source, "tokens": tokens,
                          "requested_tokens": config.requested_tokens, "family": ref.family,
                          "model_path": str(ref.path), "device": device,
                          "statistics_path": result.statistics_path,
                          "streamed": streamed is not None})

    return run_stage(store, "capture", spec, build, force)


def check_companion(gram: GramConfig, capture: CaptureConfig) -> None:
    """A gram config accumulated in the capture's pass must select the capture's tokens."""
    if gram != GramConfig.from_capture(capture, storage_dtype=gram.storage_dtype):
        raise ConfigError(f"gram config {gram.params()} does not select the tokens of capture "
                          f"config {capture.params()}; build it with GramConfig.from_capture")


def check_token_count(tokens: int, config: CaptureConfig) -> int:
    """Zero tokens is an error; fewer than requested runs on, with a warning."""
    if tokens == 0:
        raise GpruneError(f"calibration source {config.source!r} has no tokens; "
                          "give a corpus whose calibration split contains text")
    if tokens < config.requested_tokens:
        message = (f"source {config.source!r} has only {tokens} calibration tokens of the "
                   f"{config.requested_tokens} requested; capturing with what there is")
        warnings.warn(message, ShortSourceWarning, stacklevel=2)
        log.warning(message)
    return tokens


def write_table(frame, schema: pa.Schema, path) -> None:
    """Write a DataFrame as Parquet with exactly ``schema`` (column order and types)."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path)
