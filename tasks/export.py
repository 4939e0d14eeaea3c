"""Stage ``export``: a surgery checkpoint (or a dense Llama-family model) as a GGUF file
for llama.cpp (``gprune.export.gguf``; ``deci`` architecture with per-layer shapes).

The artifact holds ``model-<outtype>.gguf`` and ``results.parquet`` (one ``size`` row,
``gguf_bytes``, so the report states the file's size next to the checkpoint's other
results); its key depends on the checkpoint's identity (the surgery key, or the dense
model's fingerprint) and the ``ExportConfig``. The manifest's extra records the outtype,
the bytes and the checkpoint's run metadata.
"""
from __future__ import annotations

from artifacts.store import ArtifactStore, PendingArtifact
from gprune.configs.export import ExportConfig
from gprune.export.gguf import export_gguf
from tasks.base import run_stage, stage_spec
from gprune.eval.results import record
from tasks.checkpoint import resolve_checkpoint, write_results

STAGE = "export"


def gguf_name(config: ExportConfig) -> str:
    return f"model-{config.outtype}.gguf"


def run_export(config: ExportConfig, store: ArtifactStore, model: str,
               force: bool = False) -> str:
    """Export ``model`` (a surgery key or a dense model spec); return the artifact key."""
    checkpoint = resolve_checkpoint(store, model)
    spec = stage_spec(checkpoint.identity, {"model": checkpoint.identity}, config.params())

    def build(pending: PendingArtifact) -> None:
        out = export_gguf(checkpoint.path, config.outtype, pending.file(gguf_name(config)))
        size = out.stat().st_size
        write_results(pending, [record("size", "gguf_bytes", "bytes", size)], checkpoint,
                      outtype=config.outtype, bytes=size, model=model)

    return run_stage(store, STAGE, spec, build, force=force)
