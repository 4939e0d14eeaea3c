"""The KL check of a plan: calibration KL against brute force, the choice, and the allocate
stage keeping a plan never worse on calibration KL than the uniform MLP-only plan."""
from __future__ import annotations

import json

import pytest
import torch

from artifacts.store import ArtifactStore
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.plan_check import calibration_kl, choose_plan, pruned_copy
from gprune.models.adapters import adapter_for
from gprune.models.tiny import tiny_model
from tests.test_surgery import random_plan


def batches(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return [(ids[:2], mask[:2]), (ids[2:], mask[2:])]


def test_calibration_kl_is_zero_for_the_dense_plan_and_matches_brute_force():
    dense = tiny_model("qwen2")
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    keep_all = PruningPlan(model_fingerprint="x", family="qwen2", method="t", target_sparsity=0.1,
                           dense=shape, layers=tuple(LayerPlan.dense(shape, i)
                                                     for i in range(shape.num_layers)))
    assert calibration_kl(dense, pruned_copy(dense, adapter, keep_all, None), batches()) < 1e-6
    plan = random_plan(shape, "x", "qwen2", seed=1)
    student = pruned_copy(dense, adapter, plan, None)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches():
            p = torch.log_softmax(dense(input_ids=ids, attention_mask=mask).logits.double(), -1)
            q = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.double(), -1)
            kl = (p.exp() * (p - q)).sum(-1)[:, :-1]                          # (B, T-1)
            total += float((kl * mask[:, 1:]).sum())
            count += int(mask[:, 1:].sum())
    assert calibration_kl(dense, student, batches()) == pytest.approx(total / count, rel=1e-4)


def test_choose_plan_keeps_the_lower_kl_and_the_candidate_on_a_tie():
    shape = adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config)
    a, b = (random_plan(shape, "x", "llama", seed=s) for s in (1, 2))
    kls = {id(a): 0.3, id(b): 0.2}
    measured = []

    def kls_of(plans):
        measured.append(len(plans))
        return [kls[id(p)] for p in plans]

    assert choose_plan(a, b, kls_of) == (
        b, {"candidate": 0.3, "reference": 0.2, "chosen": "reference"})
    kls[id(a)] = 0.2
    assert choose_plan(a, b, kls_of)[0] is a
    assert choose_plan(a, a, lambda plans: [1.0] * len(plans))[1]["chosen"] == "candidate"
    assert measured == [2, 2]          # both plans measured in one call


def test_flow_plans_are_never_worse_than_uniform_mlp_only_on_calibration_kl(
        prefect_api, tmp_path):
    from flows.gprune_flow import gprune_flow
    from gprune.errors import ConfigError
    from tasks.allocate import run_allocate

    config = dict(model="tiny:llama", sources=["wikipedia", "code"], sparsities=[0.2, 0.4],
                  methods=["gprune"], capture_sequences=2, capture_seq_len=32,
                  capture_batch_size=2, evaluate=False, device="cpu")
    result = gprune_flow(config=config, store=str(tmp_path / "store"))
    store = ArtifactStore(tmp_path / "store")
    for key in result["plans"].values():
        record = store.read(key).extra["kl_check"]
        assert record["candidate"] > 0 and record["reference"] > 0
        chosen = record[record["chosen"]]
        assert chosen <= record["reference"]
        plan = json.loads((store.path(key) / "plan.json").read_text())
        if record["chosen"] == "reference":       # every head kept, MLP uniform
            assert all(len(l["heads_keep"]) == plan["dense"]["heads"] for l in plan["layers"])
    art = store.read(next(iter(result["plans"].values())))
    from gprune.configs.allocate import AllocateConfig
    with pytest.raises(ConfigError, match="gprune stage gram"):
        run_allocate(AllocateConfig(sparsity=0.3, allocator="uniform", kl_check=True), store,
                     art.manifest["inputs"]["score"], art.manifest["inputs"]["stats"])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "starcoder2"])
def test_plans_built_together_and_the_shared_teacher_give_the_single_plan_kls(family):
    from gprune.maths.plan_check import calibration_kls, dense_teacher, pruned_copies

    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    plans = [random_plan(shape, "x", family, seed=s) for s in (3, 4)]
    alone = [pruned_copy(dense, adapter, plan, None) for plan in plans]
    together = pruned_copies(dense, adapter, plans, None)
    for a, b in zip(alone, together):
        assert a.config.gprune_layers == b.config.gprune_layers
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    teacher = dense_teacher(dense, batches())
    assert teacher.hidden is not None and len(teacher.hidden) == len(batches())
    shared = calibration_kls(dense, together, batches(), teacher)
    assert shared == pytest.approx([calibration_kl(dense, s, batches()) for s in alone],
                                   rel=1e-5)
    assert min(shared) > 0


def test_plans_built_together_read_each_gram_once_and_refit_as_alone():
    import functools

    from gprune.maths.plan_check import pruned_copies
    from gprune.maths.surgery import lsq_fits

    dense = tiny_model("qwen2")
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    sizes = {"mlp": shape.intermediate, "attn": shape.heads * shape.head_dim}
    reads = []

    def gram_of(layer, kind):                          # a synthetic normalized Gram, (d+1, d+1)
        reads.append((layer, kind))
        gen = torch.Generator().manual_seed(layer * 2 + (kind == "mlp"))
        x = torch.cat([torch.randn(64, sizes[kind], generator=gen, dtype=torch.float64),
                       torch.ones(64, 1, dtype=torch.float64)], 1)
        return x.T @ x / 64

    plans = [random_plan(shape, "x", "qwen2", seed=s) for s in (5, 6)]
    together = pruned_copies(dense, adapter, plans,
                             lsq_fits(functools.lru_cache(maxsize=2)(gram_of), 1e-3, []))
    assert len(reads) == len(set(reads))               # one read per (layer, kind) for both
    for plan, model in zip(plans, together):
        alone = pruned_copy(dense, adapter, plan, lsq_fits(gram_of, 1e-3, []))
        for (name, x), (_, y) in zip(alone.state_dict().items(), model.state_dict().items()):
            assert torch.equal(x, y), name
