"""Config of the ``neurons`` stage (NSA, arXiv 2503.01542, steps 1-2): what the dense
model's units respond to and what its predictions hinge on, independent of any plan.

Neuron-word matching runs the queries of the first ``task_texts`` examples of each task
(whole) and the first ``tokens`` tokens of the calibration split of each ``sources``
corpus (documents in stored order, each cut at ``seq_len``) and keeps, per
MLP channel and per attention query head, its ``top_words`` distinct best-activating
words (from a pool of its ``pool`` best word tokens). Influential words: leave-one-word-
out on the first ``inputs`` labelled examples of each of ``tasks``.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from gprune.configs.base import StageConfig


class NeuronsConfig(StageConfig):
    sources: tuple[str, ...] = Field(("wikipedia",), min_length=1,
                                     description="corpus sources whose words units are "
                                                 "matched to")
    tokens: int = Field(4096, ge=16, description="corpus tokens run for neuron-word matching")
    seq_len: int = Field(256, ge=8, description="tokens per document at most")
    batch_size: int = Field(4, ge=1, description="documents per forward pass")
    pool: int = Field(32, ge=1, description="best word tokens kept per unit while streaming")
    top_words: int = Field(8, ge=1, description="distinct words kept per unit (rank 0: label)")
    tasks: tuple[str, ...] = Field(("sentiment_local",), min_length=1,
                                   description="labelled multiple-choice tasks whose inputs' "
                                               "influential words are selected")
    stopwords: bool = Field(True, description="skip English function words (negations kept) "
                                              "as influential-word candidates")
    task_texts: int = Field(128, ge=0, description="first examples of each task whose queries "
                            "are matched too, whole (so the task's own words match units)")
    inputs: int = Field(16, ge=1, description="examples per task scored word by word")
    choice_batch: int = Field(16, ge=1, description="(query, option) pairs per forward pass")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")

    @model_validator(mode="after")
    def _fits(self):
        if self.top_words > self.pool:
            raise ValueError(f"top_words={self.top_words} exceeds pool={self.pool}; "
                             "raise pool or lower top_words")
        return self

    def params(self):
        params = super().params()
        params.pop("device")
        return params
