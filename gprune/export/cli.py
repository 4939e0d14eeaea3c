"""Resolving ``gprune export gguf``'s checkpoint argument and naming its output."""
from __future__ import annotations

import re
from pathlib import Path

from gprune.errors import ConfigError

SURGERY_KEY = re.compile(r"^surgery-[0-9a-f]{16}$")


def checkpoint_folder(spec: str) -> Path:
    """A folder from a surgery artifact key, a folder path, or a model spec (dense)."""
    if SURGERY_KEY.match(spec):
        from artifacts.store import ArtifactStore
        from tasks.surgery import MODEL_DIR

        return ArtifactStore().read(spec, stage="surgery", hash_limit=0).path / MODEL_DIR
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a gprune checkpoint (no config.json); give a folder "
                          "written by gprune's surgery stage, its artifact key, or a dense "
                          "Llama-family model")
    if path.is_dir():
        return path.resolve()
    from gprune.models.loader import resolve_model

    return resolve_model(spec).path


def output_name(folder: Path, outtype: str) -> Path:
    """``<name>-<outtype>.gguf`` in the working directory (a store artifact is never
    written into): the surgery key for a checkpoint in the store, else the folder name."""
    name = folder.parent.name if folder.name == "model" else folder.name
    return Path.cwd() / f"{name}-{outtype}.gguf"


def export_command(spec: str, outtype: str, output: str | None) -> Path:
    from gprune.export.gguf import check_outtype, export_gguf

    check_outtype(outtype)
    folder = checkpoint_folder(spec)
    return export_gguf(folder, outtype, Path(output) if output else output_name(folder, outtype))
