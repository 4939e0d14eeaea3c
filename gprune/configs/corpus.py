"""Config of the corpus stage: which documents, and how they split into calibration/held-out."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from gprune.configs.base import StageConfig


class CorpusConfig(StageConfig):
    """A text source split by document into disjoint calibration and held-out parts.

    ``source`` is a built-in name (see ``gprune.data.corpus.known_sources``),
    ``hf:<dataset id>[:<config>[:<split>]]``, or a local .txt/.jsonl/.parquet file.
    """

    source: str = Field(min_length=1, description="built-in name, hf:<id>, or a local file")
    seed: int = Field(0, ge=0, description="seed of the document split")
    heldout_fraction: float = Field(0.2, gt=0.0, lt=1.0, allow_inf_nan=False,
                                    description="fraction of documents held out")
    max_docs: int | None = Field(None, ge=2, description="keep only the first max_docs "
                                                         "documents of the source")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, value: str) -> str:
        from gprune.data.corpus import LOCAL_SUFFIXES, known_sources, source_kind
        from gprune.errors import ConfigError

        try:
            kind = source_kind(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        if kind == "file" and not Path(value).expanduser().is_file():
            raise ValueError(f"corpus file {value} does not exist; give an existing "
                             f"{'/'.join(LOCAL_SUFFIXES)} file or one of: "
                             f"{', '.join(known_sources())}")
        return value
