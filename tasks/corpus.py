"""Corpus stage task: a text source -> docs.parquet (doc_id, text, split)."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from artifacts.store import ArtifactStore
from gprune.configs.corpus import CorpusConfig
from gprune.data.corpus import documents_digest, load_documents, split_documents
from gprune.errors import ConfigError
from tasks.base import run_stage, stage_spec

SPLITS = ("calibration", "heldout")
DOCS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("split", pa.string())])


def run_corpus(config: CorpusConfig, store: ArtifactStore, force: bool = False) -> str:
    """Load, split and store the source's documents; return the corpus artifact key.

    The key covers the documents' content hash as well as the config, so an edited
    local file or a different Python standard library gives a new artifact.
    """
    docs = load_documents(config.source)
    if config.max_docs is not None:
        docs = docs[: config.max_docs]
    frame = split_documents(docs, config.seed, config.heldout_fraction)
    inputs = {"source": config.source, "content": documents_digest(docs)}
    spec = stage_spec(None, inputs, config.params())

    def build(out) -> None:
        table = pa.Table.from_pandas(frame, schema=DOCS_SCHEMA, preserve_index=False)
        pq.write_table(table, out.file("docs.parquet"))
        counts = frame["split"].value_counts()
        out.extra.update({
            "documents": int(len(frame)),
            **{f"{split}_documents": int(counts.get(split, 0)) for split in SPLITS},
            "characters": int(frame["text"].str.len().sum()),
        })

    return run_stage(store, "corpus", spec, build, force)


def read_split(store: ArtifactStore, key: str, split: str) -> list[str]:
    """Texts of one split ('calibration' or 'heldout') of a corpus artifact, by doc_id."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    artifact = store.read(key, stage="corpus")
    frame = pd.read_parquet(artifact.file("docs.parquet"))
    part = frame[frame["split"] == split].sort_values("doc_id")
    return [str(text) for text in part["text"]]
