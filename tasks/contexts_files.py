"""File names and the reader of a contexts artifact (``tasks.contexts`` writes them); apart
from the stage so that the score stage reading them does not depend on the capture code."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from artifacts.store import ArtifactStore

STAGE = "contexts"


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


def read_contexts(store: ArtifactStore, key: str) -> list[dict[str, torch.Tensor]]:
    """Every layer's tensors of a contexts artifact (float32)."""
    art = store.read(key, stage=STAGE)
    return [{name: t.float() for name, t in load_file(str(art.file(layer_file(i)))).items()}
            for i in range(art.extra["layers"])]
