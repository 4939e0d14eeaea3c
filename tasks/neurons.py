"""Stage ``neurons`` (NSA, arXiv 2503.01542, steps 1-2): (dense model, corpora, tasks) ->
what each unit responds to and which words each task's predictions hinge on.

Plan-independent, computed once per model, corpus and tasks (every plan's ``attribution``
reads it). Neuron-word matching: ``gprune.maths.neurons`` over the tasks' first
``task_texts`` queries and the first ``tokens`` tokens of the sources' calibration splits; influential words: ``gprune.maths.influence``
(leave-one-word-out on the gold answer's log-probability) on each task's first
``inputs`` labelled examples. Files:

``matches.parquet``  layer, kind (mlp/attn), unit, rank (0 = the unit's label), word,
                     activation, doc, start, end (the word's place in ``texts.parquet``)
``texts.parquet``    doc, text (the matched texts, as far as their tokens ran)
``inputs.parquet``   task, input, query, choices (JSON), gold
``deltas.parquet``   task, input, word, start, end, delta (per word occurrence)
``words.parquet``    task, word, influence, mean_delta, inputs, rank (per task)

Manifest extra: sources, tasks, tokens, units, match_seconds, influence_seconds,
model_path, family.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.neurons import NeuronsConfig
from gprune.errors import ConfigError, GpruneError
from gprune.eval.mc_tasks import labelled_rows
from gprune.maths.influence import gold_log_probs, leave_one_out, rank_words
from gprune.maths.neurons import Block, match_units
from gprune.maths.words import encode_texts, stop_words
from gprune.models.loader import load_model, resolve_device, resolve_model
from tasks.base import run_stage, stage_spec

log = logging.getLogger("gprune")
STAGE = "neurons"
FILES = ("matches", "texts", "inputs", "deltas", "words")


def run_neurons(config: NeuronsConfig, store: ArtifactStore, model: str,
                corpus_keys: list[str], force: bool = False) -> str:
    """Match units to words and select each task's influential words; return the key."""
    from tasks.corpus import read_split

    if len(corpus_keys) != len(config.sources):
        raise ConfigError(f"neurons: {len(config.sources)} sources but {len(corpus_keys)} "
                          "corpus keys; give one corpus per source")
    texts = [t for key in corpus_keys for t in read_split(store, key, "calibration")
             if t.strip()]
    if not texts:
        raise GpruneError(f"neurons: the corpus of {', '.join(config.sources)} has no text "
                          "in its calibration split; choose a source with text")
    rows = {task: labelled_rows(task, max(config.inputs, config.task_texts))
            for task in config.tasks}
    queries = [r["query"] for task_rows in rows.values() for r in task_rows[:config.task_texts]]
    ref = resolve_model(model)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    spec = stage_spec(ref.fingerprint, {"corpora": list(corpus_keys), "tasks": digest},
                      config.params())

    def build(out) -> None:
        dense, tokenizer, adapter = load_model(ref, resolve_device(config.device))
        started = time.time()
        own = sum(len(tokenizer(q, add_special_tokens=False)["input_ids"][:config.seq_len])
                  for q in queries)
        encoded = encode_texts(queries + texts, tokenizer, config.seq_len, own + config.tokens)
        if not encoded.words:
            raise GpruneError("neurons: the corpus texts hold no words; choose a source "
                              "with text")
        matches = match_units(dense, unit_blocks(dense, adapter), encoded,
                              config.batch_size, config.pool, config.top_words)
        matched = time.time()
        log.info("neurons: %d tokens matched in %.1fs", encoded.tokens, matched - started)
        frames = {"matches": matches,
                  "texts": pd.DataFrame({"doc": range(len(encoded.texts)),
                                         "text": encoded.texts}),
                  **_influence(dense, tokenizer, {task: task_rows[:config.inputs]
                                                  for task, task_rows in rows.items()}, config)}
        for name in FILES:
            frames[name].to_parquet(out.file(f"{name}.parquet"), index=False)
        out.extra.update({"sources": list(config.sources), "tasks": list(config.tasks),
                          "tokens": encoded.tokens, "units": int(matches.groupby(
                              ["layer", "kind", "unit"]).ngroups),
                          "match_seconds": round(matched - started, 2),
                          "influence_seconds": round(time.time() - matched, 2),
                          "model_path": str(ref.path), "family": ref.family})
        log.info("neurons: %d task inputs scored word by word in %.1fs",
                 len(config.tasks) * config.inputs, time.time() - matched)

    return run_stage(store, STAGE, spec, build, force)


def unit_blocks(model, adapter) -> list[Block]:
    """Per decoder layer (MLP output projection, attention output projection or None for
    a layer without heads, query heads): what ``gprune.maths.neurons`` hooks."""
    head_dim = adapter.head_dim(model.config)
    blocks = []
    for layer in adapter.decoder_layers(model):
        mlp = adapter.mlp_output(layer)
        attn = getattr(adapter.attn_module(layer), adapter.o, None)
        blocks.append((mlp if mlp.in_features else None, attn,
                       attn.in_features // head_dim if attn is not None else 0))
    return blocks


def _influence(model, tokenizer, rows: dict[str, list[dict]],
               config: NeuronsConfig) -> dict[str, pd.DataFrame]:
    """The inputs, per-occurrence deltas and ranked words of every task."""
    inputs, deltas, words = [], [], []
    for task, examples in rows.items():
        choices = [r["choices"] for r in examples]
        gold = [r["gold"] for r in examples]
        scored = leave_one_out([r["query"] for r in examples], lambda items: gold_log_probs(
            model, tokenizer, items, choices, gold, config.choice_batch),
            skip=stop_words() if config.stopwords else frozenset())
        inputs.append(pd.DataFrame({"task": task, "input": range(len(examples)),
                                    "query": [r["query"] for r in examples],
                                    "choices": [json.dumps(c) for c in choices],
                                    "gold": gold}))
        deltas.append(scored.assign(task=task))
        words.append(rank_words(scored, len(examples)).assign(task=task))
    return {"inputs": pd.concat(inputs, ignore_index=True),
            "deltas": pd.concat(deltas, ignore_index=True),
            "words": pd.concat(words, ignore_index=True)}


def read_neurons(store: ArtifactStore, key: str) -> tuple[dict[str, pd.DataFrame], dict]:
    """(the neurons artifact's tables by name, its manifest)."""
    artifact = store.read(key, stage=STAGE)
    return ({name: pd.read_parquet(artifact.file(f"{name}.parquet")) for name in FILES},
            artifact.manifest)
