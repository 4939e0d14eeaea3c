"""NSA attribution (arXiv 2503.01542): neuron-word matching, influential words, plan damage.

A tiny Llama with planted structure: layer 0's attention writes nothing, the byte 'z' has
an embedding of its own on one hidden dimension, and MLP channel PLANTED of layer 0 reads
only that dimension, so it fires on 'z' and on nothing else.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from artifacts.store import artifact_key
from gprune.configs.attribution import AttributionConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.neurons import NeuronsConfig
from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ConfigError, GpruneError
from gprune.maths.influence import leave_one_out, rank_words
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.models.adapters import adapter_for
from gprune.models.loader import resolve_model
from gprune.models.tiny import byte_tokenizer, tiny_model
from tasks.attribution import run_attribution
from tasks.corpus import run_corpus
from tasks.neurons import read_neurons, run_neurons
from tasks.surgery import run_surgery

PLANTED, DIM = 5, 7
CORPUS = ("the quiet zoo opens at nine and the keeper feeds the lions before noon "
          "while visitors walk along the river path toward the old mill ")
TASK_ROWS = [
    {"query": "Review: a zoo of fun\nSentiment:", "choices": ["negative", "positive"], "gold": 1},
    {"query": "Review: the zoo was dull\nSentiment:", "choices": ["negative", "positive"],
     "gold": 0},
    {"query": "Review: what a lovely zoo\nSentiment:", "choices": ["negative", "positive"],
     "gold": 1},
]


def planted_model(folder):
    """Save the planted tiny Llama (with the byte tokenizer) to ``folder``."""
    model = tiny_model("llama", seed=3)
    z = byte_tokenizer().convert_tokens_to_ids("z")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight                        # (V, hidden)
        emb[:, DIM] = 0.0
        emb[z] = 0.0
        emb[z, DIM] = 1.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[PLANTED] = 0.0
            proj.weight[PLANTED, DIM] = 4.0
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import json

    from artifacts.store import ArtifactStore

    root = tmp_path_factory.mktemp("nsa")
    store = ArtifactStore(root / "store")
    model = planted_model(root / "model")
    text = root / "corpus.txt"
    text.write_text("".join(f"{CORPUS}{i}\n\n" for i in range(40)))
    task = root / "tiny_reviews.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    corpus = run_corpus(CorpusConfig(source=str(text)), store)
    config = NeuronsConfig(sources=(str(text),), tokens=600, seq_len=128, tasks=(str(task),),
                           inputs=3, device="cpu")
    neurons = run_neurons(config, store, model, [corpus])
    return store, model, neurons, root


def write_plan(store, model: str, drop_planted: bool) -> str:
    """A hand-made plan of the planted model: keeps every unit but channel PLANTED of
    layer 0 (``drop_planted``) or channel PLANTED + 1."""
    from transformers import AutoConfig

    ref = resolve_model(model)
    shape = adapter_for(AutoConfig.from_pretrained(ref.path)).shape(
        AutoConfig.from_pretrained(ref.path))
    gone = PLANTED if drop_planted else PLANTED + 1
    layers = tuple(LayerPlan(i, tuple(c for c in range(shape.intermediate)
                                      if i != 0 or c != gone),
                             tuple(range(shape.heads)), tuple(range(shape.kv_heads)))
                   for i in range(shape.num_layers))
    plan = PruningPlan(ref.fingerprint, ref.family, "handmade", 0.01, shape, layers)
    spec = {"model": ref.fingerprint, "inputs": {"drop": gone}, "params": {}}
    key = artifact_key("allocate", spec)
    with store.write(key, "allocate", spec) as pending:
        plan.write(pending.path)
        pending.extra.update({"model_path": str(ref.path), "method": "handmade"})
    return key


def test_matching_finds_the_planted_token_first(planted):
    store, _, neurons, _ = planted
    tables, _ = read_neurons(store, neurons)
    matches = tables["matches"]
    unit = matches[(matches.layer == 0) & (matches.kind == "mlp") & (matches.unit == PLANTED)]
    assert unit.sort_values("rank")["word"].iloc[0] == "zoo"
    zoo = matches[matches.word == "zoo"].sort_values("selectivity", ascending=False)
    assert tuple(zoo.iloc[0][["layer", "kind", "unit"]]) == (0, "mlp", PLANTED)
    text = tables["texts"].set_index("doc")["text"]
    first = unit.sort_values("rank").iloc[0]
    assert text[first.doc][first.start:first.end].lower() == "zoo"
    # no other unit of layer 0's MLP ranks 'zoo' first with the planted unit's strength
    assert unit["activation"].max() > 10 * matches[(matches.layer == 0) & (
        matches.kind == "mlp") & (matches.unit != PLANTED)]["activation"].median()


def test_influential_word_ranks_the_decisive_word_first():
    queries = ["Review: the film was great fun\nSentiment:",
               "Review: a dull and boring mess\nSentiment:",
               "Review: great acting, thin plot\nSentiment:"]
    deltas = leave_one_out(queries, lambda items: torch.tensor(
        [2.0 if "great" in q else 0.0 for _, q in items]))
    ranked = rank_words(deltas, len(queries))
    assert ranked["word"].iloc[0] == "great"
    assert "review" not in set(ranked["word"]) and "sentiment" not in set(ranked["word"])


@pytest.mark.parametrize("drop", [True, False])
def test_a_plan_that_removes_the_neuron_damages_its_word(planted, drop):
    store, model, neurons, _ = planted
    plan = write_plan(store, model, drop_planted=drop)
    checkpoint = run_surgery(SurgeryConfig(reconstruct="none", device="cpu"), store, plan)
    key = run_attribution(AttributionConfig(top_n=50, units_per_word=4, device="cpu"), store,
                          neurons, plan,
                          checkpoint)
    art = store.read(key)
    import pandas as pd

    damage = pd.read_parquet(art.file("damage.parquet"))
    zoo = damage[damage.word == "zoo"].iloc[0]
    assert zoo["matched"] >= 1
    threshold = AttributionConfig().threshold
    summary = pd.read_parquet(art.file("summary.parquet")).iloc[0]
    assert 0 < summary["units_removed"] < 0.01        # one MLP channel of many units
    if drop:
        assert zoo["pruned"] >= 1 and zoo["lost"] >= threshold
        assert "zoo" in summary["most_damaged"].split(", ") and summary["damaged"] >= 1
    else:
        assert zoo["lost"] < threshold
    for name in ("attribution.html", "labels.png", "damage.png", "summary.md"):
        assert art.file(name).stat().st_size > 100
    html = art.file("attribution.html").read_text()
    assert "data:image/png;base64," in html and "zoo" in html
    assert len(pd.read_parquet(art.file("shift.parquet"))) > 0


def test_bad_input_one_line_errors_and_nothing_written(planted, tmp_path):
    import json

    store, model, neurons, root = planted
    before = sorted(p.name for p in (store.root).rglob("*") if p.is_dir())
    other = write_plan(store, "tiny:llama", drop_planted=True)
    with pytest.raises(ConfigError, match="same model"):
        run_attribution(AttributionConfig(device="cpu"), store, neurons, other)
    unlabelled = tmp_path / "nolabels.jsonl"
    unlabelled.write_text(json.dumps({"query": "a zoo", "choices": ["a", "b"]}) + "\n")
    corpus = run_corpus(CorpusConfig(source=str(root / "corpus.txt")), store)
    with pytest.raises(ConfigError, match="no labelled rows"):
        run_neurons(NeuronsConfig(sources=("x",), tasks=(str(unlabelled),), device="cpu"),
                    store, model, [corpus])
    with pytest.raises(ConfigError, match="labelled multiple-choice"):
        run_neurons(NeuronsConfig(sources=("x",), tasks=("wikipedia",), device="cpu"),
                    store, model, [corpus])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n  \n")
    with pytest.raises(GpruneError) as err:
        empty_corpus = run_corpus(CorpusConfig(source=str(empty)), store)
        run_neurons(NeuronsConfig(sources=(str(empty),), device="cpu"), store, model,
                    [empty_corpus])
    assert "\n" not in str(err.value)
    after = sorted(p.name for p in (store.root).rglob("*") if p.is_dir())
    assert {n for n in after if n.startswith(("neurons-", "attribution-"))} == \
        {n for n in before if n.startswith(("neurons-", "attribution-"))}


def test_flow_flag_runs_attribution_per_plan_and_links_it_from_the_report(prefect_api,
                                                                          tmp_path):
    import json

    from flows.gprune_flow import gprune_flow

    task = tmp_path / "tiny_reviews.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    config = dict(model="tiny:llama", sources=["docs"], eval_sources=["docs"],
                  methods=["wanda_sp"], sparsities=[0.3], capture_sequences=2,
                  capture_seq_len=32, capture_batch_size=2, eval_tokens=64, eval_seq_len=32,
                  mc_tasks=[], device="cpu", attribution=True,
                  attribution_tasks=[str(task)], attribution_inputs=2, attribution_tokens=300)
    state = gprune_flow(config=config, store=str(tmp_path / "store"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert list(result["attributions"]) == ["wanda_sp@0.3"]
    report = (Path(result["report_dir"]) / "report.md").read_text()
    assert "NSA attribution" in report and "attribution.html" in report
    with pytest.raises(ConfigError, match="labelled multiple-choice"):
        gprune_flow(config={**config, "attribution_tasks": ["wikipedia"]},
                    store=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
