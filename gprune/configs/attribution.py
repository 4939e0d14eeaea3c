"""Config of the ``attribution`` stage (NSA, arXiv 2503.01542, step 3): a plan against
the dense model's neuron-word matches and influential words.

The ``top_n`` most influential words of each task are compared, each with the
``units_per_word`` most selective units matched to it; a word is damaged when the plan
removes at least ``threshold`` of them (selectivity-weighted). Figures: ``layers_shown``
layers (the most damaged) of kept vs pruned units' labels.
"""
from __future__ import annotations

from pydantic import Field

from gprune.configs.base import StageConfig


class AttributionConfig(StageConfig):
    top_n: int = Field(30, ge=1, description="influential words per task compared")
    units_per_word: int = Field(16, ge=1, description="most selective matched units per word")
    threshold: float = Field(0.5, gt=0, le=1, description="lost share that makes a word "
                                                          "damaged")
    layers_shown: int = Field(6, ge=1, description="layers drawn in the kept-vs-pruned figure")
    labels_shown: int = Field(8, ge=1, description="labels per layer panel")
    batch_size: int = Field(8, ge=1, description="task inputs per forward pass (shift)")
    dpi: int = Field(110, ge=50, le=600, description="figure resolution")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")

    def params(self):
        params = super().params()
        params.pop("device")
        return params
