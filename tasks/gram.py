"""Stage 1b task: (model, corpus artifact) -> the Gram matrices of one source, and their readers.

The companion of ``capture``: with equal token settings (``GramConfig.from_capture``) it
runs exactly the capture's calibration tokens (the same sampler and token check).

Files of a gram artifact, one per decoder layer, ``layer_000.safetensors``,
``layer_001.safetensors``, ...; tensors, in the config's ``storage_dtype`` (float32 by
default, or float64; accumulated in float64 either way):

``mlp``  (d_mlp+1, d_mlp+1): the Gram of [x, 1] over the source's real (non-padding)
         tokens, x the input of the MLP output projection (d_mlp = intermediate size);
``attn`` (d_attn+1, d_attn+1): the same for the attention output projection
         (d_attn = heads * head_dim; query head h owns channels h*head_dim ..; GQA too).

Both are symmetric: the top-left d x d block is sum x x^T, the last column and the last row
hold sum x, the corner the token count. Manifest extra: source, tokens (exact),
requested_tokens, model_path, family, device, shape (the model's ModelShape), dims (per
layer {"mlp": d, "attn": d}), storage_dtype, accumulation ("float64"), update_flops_per_token
(the blocked upper-triangle updates, ``gprune.maths.gram.gram_flops_per_token``), bytes (the
files), memory_bytes (the float64 accumulators), layers (per layer: mlp/attn max_abs and
finite).

Readers (for later stages): ``read_gram(store, key, layer)`` -> {"mlp", "attn"} float64;
``pooled_gram(store, keys, layer, kind, normalize)`` over sources; ``check_gram_matches(
gram_artifact, capture_artifact)``; ``check_gram_model(gram_artifact, fingerprint)``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from artifacts.memo import TensorMemo, default_budget
from artifacts.store import Artifact, ArtifactStore, artifact_key, file_sha256
from gprune.configs.gram import GramConfig
from gprune.errors import ArtifactError, ConfigError, CorruptArtifactError
from gprune.maths.gram import (KINDS, GramResult, NonFiniteGramError, accumulate_grams,
                               describe_cost, gram_bytes, gram_dims, gram_flops_per_token,
                               non_finite_message)
from gprune.maths.calibrate import streamed_statistics
from gprune.models.loader import resolve_device, resolve_model
from gprune.models.streamed import open_model
from tasks.base import intact, run_stage, stage_spec

log = logging.getLogger("gprune")
STAGE = "gram"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
PAIRED = ("source", "n_sequences", "seq_len", "seed")   # what makes the same tokens


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def run_gram(config: GramConfig, store: ArtifactStore, model: str, corpus_key: str,
             force: bool = False) -> str:
    """Accumulate one source's Gram matrices; return the gram artifact key."""
    ref = resolve_model(model)

    def build(out) -> None:
        device = resolve_device(config.device)
        dense, tokenizer, adapter, streamed = open_model(
            ref.path, device, config.stream, config.batch_size * config.seq_len,
            head=False)   # calibration needs no logits: no full token embedding either
        input_ids, attention_mask, tokens = calibration_tokens(store, corpus_key, tokenizer,
                                                               config)
        log.info("gram %s: %s%s", config.source,
                 describe_cost(gram_dims(dense, adapter), config.storage_dtype),
                 " (layer-streamed)" if streamed is not None else "")
        if streamed is not None:
            _, result = streamed_statistics(streamed, input_ids, attention_mask,
                                            config.batch_size, label=config.source,
                                            capture=False, grams=True)
        else:
            result = accumulate_grams(dense, adapter, input_ids, attention_mask,
                                      config.batch_size, label=config.source)
        assert result.tokens == tokens, (result.tokens, tokens)
        write_grams(out, result, config, ref, device, dense, adapter)

    return run_stage(store, STAGE, gram_spec(config, ref, corpus_key), build, force)


def gram_spec(config: GramConfig, ref, corpus_key: str) -> dict:
    """What a gram artifact depends on (``ref``: the resolved model)."""
    return stage_spec(ref.fingerprint, {"corpus": corpus_key}, config.params())


def store_grams(store: ArtifactStore, result: GramResult, config: GramConfig, ref,
                corpus_key: str, device: str, dense, adapter) -> str:
    """Store Grams accumulated elsewhere (the capture's joint pass) as the gram artifact
    this config would build: same key, same files; an intact stored one is kept."""
    return run_stage(store, STAGE, gram_spec(config, ref, corpus_key),
                     lambda out: write_grams(out, result, config, ref, device, dense, adapter))


def gram_stored(store: ArtifactStore, config: GramConfig, ref, corpus_key: str) -> bool:
    """Whether the gram artifact of this config is stored and intact."""
    return intact(store, STAGE, artifact_key(STAGE, gram_spec(config, ref, corpus_key)))


def write_grams(out, result: GramResult, config: GramConfig, ref, device: str, dense,
                adapter) -> None:
    """Write every layer's Grams and the manifest extra into the pending artifact ``out``."""
    dims = gram_dims(dense, adapter)
    layers = [write_layer(out.file(layer_file(i)), result.layer(i), i, config)
              for i in range(result.num_layers)]
    files = sum(out.file(layer_file(i)).stat().st_size for i in range(len(layers)))
    out.extra.update({
        "source": config.source, "tokens": result.tokens,
        "requested_tokens": config.requested_tokens, "model_path": str(ref.path),
        "family": ref.family, "device": device,
        "shape": dataclasses.asdict(adapter.shape(dense.config)), "dims": dims,
        "storage_dtype": config.storage_dtype, "accumulation": "float64",
        "update_flops_per_token": gram_flops_per_token(dims), "bytes": files,
        "memory_bytes": gram_bytes(dims, 8), "layers": layers})
    log.info("gram %s: %d tokens, %d layers, %.1f MB on disk (%s)", config.source,
             result.tokens, len(layers), files / 1e6, config.storage_dtype)


def calibration_tokens(store: ArtifactStore, corpus_key: str, tokenizer, config: GramConfig):
    """(input_ids, attention_mask, real tokens): capture's sampler and token check, so equal
    token settings select exactly the capture's tokens."""
    from gprune.data.corpus import sample_sequences
    from tasks.capture import check_token_count
    from tasks.corpus import read_split

    texts = read_split(store, corpus_key, "calibration")
    input_ids, attention_mask = sample_sequences(texts, tokenizer, config.n_sequences,
                                                 config.seq_len, config.seed)
    return input_ids, attention_mask, check_token_count(int(attention_mask.sum()), config)


def write_layer(path: Path, grams: dict[str, torch.Tensor], layer: int,
                config: GramConfig) -> dict:
    """Write one layer's Grams in the storage dtype; return its manifest entry.
    A non-finite entry (also after rounding to float32) is an error naming the layer."""
    stored = {kind: grams[kind].to(DTYPES[config.storage_dtype]).cpu().contiguous()
              for kind in KINDS}
    entry: dict = {"layer": layer}
    for kind, tensor in stored.items():
        finite = bool(torch.isfinite(tensor).all())
        if not finite:
            raise NonFiniteGramError(non_finite_message(layer, kind, config.source))
        entry[f"{kind}_max_abs"] = float(tensor.abs().max())
        entry[f"{kind}_finite"] = finite
    save_file(stored, str(path), metadata={"layer": str(layer), "source": config.source,
                                           "content": "Gram of [x, 1]; corner: tokens"})
    return entry


# ---- readers -------------------------------------------------------------------------
def gram_artifact(store: ArtifactStore, key: str, model: str | None = None) -> Artifact:
    """The gram artifact ``key`` (sizes checked; each layer file is hashed when first read);
    with ``model`` (a fingerprint), one computed on another model is refused."""
    art = store.read(key, stage=STAGE, hash_limit=0)
    if model is not None:
        check_gram_model(art, model)
    return art


def check_gram_model(gram: Artifact, model: str) -> None:
    """Refuse a gram artifact computed on another model than the fingerprint ``model``."""
    if gram.manifest.get("model") != model:
        raise ArtifactError(
            f"gram artifact {gram.key} was computed on another model "
            f"({gram.extra.get('model_path')}, fingerprint {gram.manifest.get('model')}, not "
            f"{model}); run `gprune stage gram --model <this model>` for it")


def check_gram_matches(gram: Artifact, capture: Artifact) -> None:
    """Refuse a gram artifact that did not see the capture's tokens: another model, corpus,
    source, n_sequences, seq_len or seed."""
    check_gram_model(gram, capture.manifest.get("model"))
    if gram.manifest.get("inputs", {}).get("corpus") != \
            capture.manifest.get("inputs", {}).get("corpus"):
        raise ArtifactError(f"gram artifact {gram.key} was computed on another corpus than "
                            f"capture {capture.key}; recompute it from the capture's corpus")
    for name in PAIRED:
        ours, theirs = gram.params.get(name), capture.params.get(name)
        if ours != theirs:
            raise ArtifactError(
                f"gram artifact {gram.key} has {name}={ours} but capture {capture.key} has "
                f"{name}={theirs}; recompute the gram with the capture's settings "
                f"(gprune stage gram --{name.replace('_', '-')} {theirs})")


_VERIFIED: set[tuple] = set()   # layer files whose sha256 matched, by (path, inode, mtime, size)


_POOLED = TensorMemo(default_budget())   # pooled Grams, by the files they were read from
_DERIVED = TensorMemo(default_budget() // 2)   # refits and dense products, by the same files


def _verified_file(art: Artifact, layer: int) -> tuple[Path, tuple]:
    """A layer file's path and identity (path, inode, mtime, size), its sha256 checked the
    first time this process sees that identity."""
    name = layer_file(layer)
    info = art.manifest.get("files", {}).get(name)
    if info is None:
        layers = len(art.extra.get("layers", []))
        raise ArtifactError(f"gram artifact {art.key} has no layer {layer} ({layers} layers)")
    path = art.file(name)
    stat = path.stat()
    ident = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    if ident not in _VERIFIED:
        if stat.st_size != info["bytes"] or file_sha256(path) != info.get("sha256"):
            raise CorruptArtifactError(art.key, f"file {name} does not match its sha256")
        _VERIFIED.add(ident)
    return path, ident


def _read(art: Artifact, layer: int, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Upcast float64 Grams of one layer; a NaN/inf is an error naming layer, kind, source."""
    with safe_open(str(_verified_file(art, layer)[0]), framework="pt") as f:
        grams = {kind: f.get_tensor(kind).to(torch.float64) for kind in kinds}
    for kind, gram in grams.items():
        if not bool(torch.isfinite(gram).all()):
            raise NonFiniteGramError(non_finite_message(layer, kind, art.extra.get("source", "")))
    return grams


def read_gram(store: ArtifactStore, key: str, layer: int,
              model: str | None = None) -> dict[str, torch.Tensor]:
    """{"mlp": (d_mlp+1, d_mlp+1), "attn": (d_attn+1, d_attn+1)} float64 sums of one layer
    (corner: the token count); ``model``: refuse a gram of another model fingerprint."""
    return _read(gram_artifact(store, key, model), layer, KINDS)


def pooled_gram(store: ArtifactStore, keys: list[str], layer: int, kind: str,
                normalize: Literal["per_source", "sum"] = "per_source",
                model: str | None = None) -> torch.Tensor:
    """One (d+1, d+1) float64 Gram of ``kind`` at ``layer`` over several sources' artifacts.

    ``per_source`` (default): the mean over sources of each source's Gram divided by its
    token count, i.e. the second moments of [x, 1] with every source weighted equally
    (corner 1; no source dominates by its token count). ``sum``: the plain sum, i.e.
    token-weighted (corner = total tokens; divide by it for the token-weighted mean).
    The artifacts must share one model (and ``model``, when given).
    """
    if kind not in KINDS or normalize not in ("per_source", "sum") or not keys:
        raise ConfigError(f"pooled_gram: kind in {KINDS}, normalize per_source or sum, and "
                          f"at least one key; got {kind!r}, {normalize!r}, {len(keys)} keys")
    arts = [gram_artifact(store, key, model) for key in keys]
    for art in arts[1:]:
        check_gram_model(art, arts[0].manifest.get("model"))
    files = tuple(_verified_file(art, layer)[1] for art in arts)
    return _POOLED.get((files, kind, normalize), lambda: _pooled(arts, layer, kind, normalize))


def _pooled(arts: list[Artifact], layer: int, kind: str, normalize: str) -> torch.Tensor:
    total = None
    for art in arts:
        gram = _read(art, layer, (kind,))[kind]                              # (d+1, d+1)
        if normalize == "per_source":
            gram = gram / art.extra["tokens"]
        if total is not None and total.shape != gram.shape:
            raise ArtifactError(f"gram artifact {art.key}: layer {layer} {kind} is "
                                f"{tuple(gram.shape)}, others {tuple(total.shape)}")
        total = gram if total is None else total + gram
    return total / len(arts) if normalize == "per_source" else total


def gram_memo(store: ArtifactStore, keys: list[str]):
    """A ``gprune.maths.surgery.Memo`` for refits from ``pooled_gram(store, keys, layer,
    kind)`` (per-source normalized): values are remembered by the Gram files they came from
    (as the pooled Grams are), so the targets of a sweep, their KL checks and their
    surgeries share what they solve."""
    arts = [gram_artifact(store, key) for key in keys]

    def remember(layer: int, kind: str, key: tuple, compute):
        files = tuple(_verified_file(art, layer)[1] for art in arts)
        return _DERIVED.get((files, kind, "per_source", key), compute)

    return remember
