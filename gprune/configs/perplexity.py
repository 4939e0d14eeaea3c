"""Config of the ``perplexity`` stage: held-out perplexity budget (sizing advice in
``gprune.configs.evaluate``)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gprune.configs.evaluate import EvalStageConfig


class PerplexityConfig(EvalStageConfig):
    """Per corpus source, ``ceil(ppl_tokens / seq_len)`` windows of ``seq_len`` tokens
    drawn from the held-out split (``gprune.data.corpus.sample_sequences`` with ``seed``);
    ``seq_len`` is cut to the model's context length when longer. The window length also
    sets the context at which FLOPs per token are counted."""

    ppl_tokens: int = Field(2048, ge=2, le=10_000_000,
                            description="held-out tokens per corpus source (perplexity budget)")
    seq_len: int = Field(512, ge=2, le=131072, description="tokens per perplexity window")
    batch_size: int = Field(4, ge=1, le=1024, description="perplexity windows per forward pass")
    stream: Literal["auto", "on", "off"] = Field(
        "auto", description="layer-streamed evaluation, one decoder layer's weights on the "
                            "device at a time (docs/SCALE.md); auto: when the weights do not "
                            "fit the device's free memory")

    def params(self) -> dict[str, Any]:
        """Key parameters: ``stream`` only changes how the perplexity is computed."""
        params = super().params()
        params.pop("stream")
        return params
