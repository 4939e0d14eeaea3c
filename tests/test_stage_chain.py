"""Stages 1-6 chained on tiny models through the store: real statistics, every method."""
from __future__ import annotations

import pytest
import torch

from gprune.configs.allocate import AllocateConfig
from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.stats import StatsConfig
from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ConfigError
from gprune.maths.plan import PruningPlan
from gprune.methods.base import Method
from gprune.methods.registry import build_method
from gprune.models.loader import load_model
from tasks.allocate import run_allocate
from tasks.capture import run_capture
from tasks.corpus import run_corpus
from tasks.partition import run_partition
from tasks.path import run_path
from tasks.score import run_score
from tasks.stats import run_stats
from tasks.surgery import run_surgery

TEXTS = {
    "prose": "The river ran past the old mill, and the miller's daughter watched the boats.\n\n",
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n\n",
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Corpus, capture and stats for tiny:qwen2 (GQA, attention biases) over two local sources."""
    from artifacts.store import ArtifactStore

    root = tmp_path_factory.mktemp("chain")
    store = ArtifactStore(root / "store")
    captures = []
    for name, text in TEXTS.items():
        path = root / f"{name}.txt"
        path.write_text("".join(f"{text.strip()} ({i})\n\n" for i in range(60)))
        corpus = run_corpus(CorpusConfig(source=str(path)), store)
        config = CaptureConfig(source=name, n_sequences=4, seq_len=48, batch_size=2)
        captures.append(run_capture(config, store, "tiny:qwen2", corpus))
    stats = run_stats(StatsConfig(), store, captures)
    return store, captures, stats


def plan_for(store, stats, method: Method, sparsity: float) -> str:
    """partition -> score -> (path) -> allocate for one method, as the flow chains them."""
    partition = run_partition(method.partition_config(), store, stats)
    score = run_score(method.score_config(), store, stats, partition)
    config = AllocateConfig(sparsity=sparsity, allocator=method.allocator, steps=3,
                            n_sequences=2, seq_len=32)
    path = run_path(config, store, score, stats) if method.serves_all_targets else None
    return run_allocate(config, store, score, stats, method=method.label,
                        reconstruct=method.reconstruct, path_key=path)


@pytest.mark.parametrize("method", ["gprune", "flap", "wanda_sp", "magnitude_sp"])
@pytest.mark.parametrize("sparsity", [0.2, 0.45])
def test_every_method_makes_a_valid_plan(chain, method, sparsity):
    store, _, stats = chain
    plan_key = plan_for(store, stats, build_method(method), sparsity)
    plan = PruningPlan.read(store.read(plan_key, stage="allocate").path)
    assert abs(plan.achieved_sparsity - sparsity) <= 0.005
    assert plan.method == method
    assert all(len(layer.mlp_keep) >= 10 for layer in plan.layers)   # 10% of 96 channels
    assert plan_for(store, stats, build_method(method), sparsity) == plan_key


def test_plan_to_checkpoint_runs(chain):
    store, _, stats = chain
    plan_key = plan_for(store, stats, build_method("flap"), 0.3)
    checkpoint = run_surgery(SurgeryConfig(), store, plan_key, stats)
    model, tokenizer, _ = load_model(store.read(checkpoint).path / "model")
    logits = model(**tokenizer(["def add(a, b):"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_stats_refuses_captures_of_another_model(chain, tmp_path):
    store, captures, _ = chain
    corpus = store.read(captures[0], stage="capture").manifest["inputs"]["corpus"]
    other = run_capture(CaptureConfig(source="prose", n_sequences=2, seq_len=32), store,
                        "tiny:llama", corpus)
    from gprune.errors import ArtifactError

    with pytest.raises(ArtifactError):
        run_stats(StatsConfig(), store, [captures[0], other])


def test_gate_on_single_source_is_refused(chain):
    store, captures, _ = chain
    single = run_stats(StatsConfig(), store, captures[:1])
    method = build_method("gprune:gate=true")
    partition = run_partition(method.partition_config(), store, single)
    with pytest.raises(ConfigError, match=">= 2"):
        run_score(method.score_config(), store, single, partition)
    no_gate = build_method("gprune")   # the default: no gate
    assert run_score(no_gate.score_config(), store, single, partition)
