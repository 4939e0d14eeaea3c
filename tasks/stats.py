"""Stage 2 task: capture artifacts of D sources + model weights -> per-unit statistics.

Files of a stats artifact (sources in the order of ``capture_keys``, recorded in the
manifest):

``units.parquet``, one row per (layer, kind, unit); unit = MLP channel or query head:
    layer int32, kind string ("mlp" | "attn"), unit int32,
    weight_score float64   activation-independent: MLP ||W_out[:,u]|| *
                           sqrt(||W_gate[u]|| * ||W_up[u]||) (non-gated: ||W_out[:,u]|| *
                           ||W_in[u]||); head ||W_o[:, head cols]||_F * ||W_q[head rows]||_F
    freq float64           mean over sources of active / count (heads: mean over channels)
  and for each metric m of StatsConfig.metrics (default wanda_sp, flap):
    m list<float64>        per-source score
    m_rank list<float64>   per-source rank within (layer, kind) in [0, 1], highest -> 1
    m_sensitivity float64  population std over sources of m_rank (NaN with one source)
    m_magnitude float64    mean over sources of score / mean score of the (layer, kind)
    m_pooled float64       the metric from the statistics pooled over all sources
    m_pooled_z float64     FLAP's standardized score from the pooled channel scores
                           (``gprune.maths.stats``): MLP channel (s - mean) / std over the
                           layer's channels (ddof=1); head: the layer's channel scores
                           squared, standardized over its H * head_dim channels (ddof=1),
                           averaged over the head's channels
    m_magnitude_z float64  the same from the channels' magnitudes (mean over sources of
                           channel score / the layer's mean channel score)
``channels.parquet``: layer int32, kind string, channel int32, count int64, mean float64,
    var float64 (pooled over sources; population variance)
``layers.parquet``: layer int32, cosine float64 (pooled mean per-token cosine between the
    hidden states entering and leaving the layer)

Manifest extra: sources, capture_keys, tokens (per source), family, model_path, shape.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa

from artifacts.store import Artifact, ArtifactStore
from gprune.configs.stats import StatsConfig
from gprune.errors import ArtifactError, ConfigError
from gprune.maths.stats import layer_weights
from gprune.maths.stats_tables import pooled_channels, pooled_layers, units_table
from gprune.models.adapters import ModelShape
from gprune.models.loader import fingerprint, load_model
from tasks.base import run_stage, stage_spec
from tasks.capture import write_table

LIST = pa.list_(pa.float64())
CHANNELS_SCHEMA = pa.schema([
    ("layer", pa.int32()), ("kind", pa.string()), ("channel", pa.int32()),
    ("count", pa.int64()), ("mean", pa.float64()), ("var", pa.float64())])
LAYERS_SCHEMA = pa.schema([("layer", pa.int32()), ("cosine", pa.float64())])


def units_schema(metrics: tuple[str, ...]) -> pa.Schema:
    fields = [("layer", pa.int32()), ("kind", pa.string()), ("unit", pa.int32()),
              ("weight_score", pa.float64()), ("freq", pa.float64())]
    for m in metrics:
        fields += [(m, LIST), (f"{m}_rank", LIST), (f"{m}_sensitivity", pa.float64()),
                   (f"{m}_magnitude", pa.float64()), (f"{m}_peak", pa.float64()),
                   (f"{m}_pooled", pa.float64()),
                   (f"{m}_pooled_z", pa.float64()), (f"{m}_magnitude_z", pa.float64())]
    return pa.schema(fields)


def run_stats(config: StatsConfig, store: ArtifactStore, capture_keys: list[str],
              force: bool = False) -> str:
    """Per-unit metrics, ranks and sensitivity over the captures; return the stats key."""
    captures = read_captures(store, capture_keys)
    model_fingerprint = captures[0].manifest["model"]
    spec = stage_spec(model_fingerprint, {"captures": list(capture_keys)}, config.params())

    def build(out) -> None:
        model_path = captures[0].extra["model_path"]
        weights, shape, family = load_weights(model_path, model_fingerprint)
        frames = [pd.read_parquet(c.file("channels.parquet")) for c in captures]
        check_shapes(frames, shape, capture_keys)
        units = units_table(frames, weights, shape.head_dim, config.channel_metrics())
        write_table(units, units_schema(config.metrics), out.file("units.parquet"))
        write_table(pooled_channels(frames), CHANNELS_SCHEMA, out.file("channels.parquet"))
        layers = pooled_layers([pd.read_parquet(c.file("layers.parquet")) for c in captures])
        write_table(layers, LAYERS_SCHEMA, out.file("layers.parquet"))
        out.extra.update({"sources": [c.extra["source"] for c in captures],
                          "capture_keys": list(capture_keys),
                          "tokens": [c.extra["tokens"] for c in captures],
                          "family": family, "model_path": model_path, "shape": asdict(shape)})

    return run_stage(store, "stats", spec, build, force)


def read_captures(store: ArtifactStore, capture_keys: list[str]) -> list[Artifact]:
    """The capture artifacts, refusing none, repeats, or a mix of model fingerprints."""
    if not capture_keys:
        raise ConfigError("stats needs at least one capture key; run capture first")
    repeated = sorted({k for k in capture_keys if list(capture_keys).count(k) > 1})
    if repeated:
        raise ConfigError(f"capture key {repeated[0]} is given more than once; "
                          "give each source's capture once")
    captures = [store.read(key, stage="capture") for key in capture_keys]
    first = captures[0]
    for other in captures[1:]:
        if other.manifest["model"] != first.manifest["model"]:
            raise ArtifactError(
                f"captures {first.key} (model {first.manifest['model']}) and {other.key} "
                f"(model {other.manifest['model']}) come from different models; "
                "capture every source with the same model")
    return captures


def load_weights(model_path: str, expected_fingerprint: str):
    """(layer weights, dense shape, family) of the captured model, refusing a changed folder."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"the captured model folder {path} is gone; "
                            "rerun capture with the model available")
    if fingerprint(path) != expected_fingerprint:
        raise ArtifactError(f"the model at {path} changed since it was captured "
                            f"(fingerprint {fingerprint(path)} != {expected_fingerprint}); "
                            "rerun capture")
    model, _, adapter = load_model(path, "cpu")
    return layer_weights(model, adapter), adapter.shape(model.config), adapter.name


def check_shapes(frames: list[pd.DataFrame], shape: ModelShape, keys: list[str]) -> None:
    """Every capture has one block per (layer, kind) of the model's dense sizes."""
    widths = {"mlp": shape.intermediate, "attn": shape.heads * shape.head_dim}
    for frame, key in zip(frames, keys):
        sizes = frame.groupby(["layer", "kind"]).size()
        expected = {(layer, kind): width for layer in range(shape.num_layers)
                    for kind, width in widths.items()}
        if {(int(l), str(k)): int(n) for (l, k), n in sizes.items()} != expected:
            raise ArtifactError(f"capture {key} does not match the model's layer sizes; "
                                "delete it and rerun capture")
