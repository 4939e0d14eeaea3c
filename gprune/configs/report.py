"""Config of the ``report`` stage: how the table, Markdown and plots are rendered."""
from __future__ import annotations

from pydantic import Field

from gprune.configs.base import StageConfig


class ReportConfig(StageConfig):
    title: str = Field("gprune results", min_length=1, max_length=200)
    dpi: int = Field(110, ge=50, le=400, description="PNG resolution")
    ppl_log_scale: bool = Field(True, description="log-scale perplexity axes")
