"""The KL check of a plan: calibration KL against brute force, the choice, and the allocate
stage keeping a plan never worse on calibration KL than the uniform MLP-only plan."""
from __future__ import annotations

import json

import pytest
import torch

from artifacts.store import ArtifactStore
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.plan_check import (SequenceKls, calibration_kl, calibration_rounds,
                                     choose_plan, decisive, pruned_copy, split_rounds)
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


def fake_kls(per_sequence: list[list[float]], tokens: list[float]) -> SequenceKls:
    """SequenceKls whose students have these per-token-mean KLs per sequence."""
    kls = SequenceKls(len(per_sequence))
    kls.sums = [[kl * n for kl, n in zip(student, tokens)] for student in per_sequence]
    kls.tokens = list(tokens)
    return kls


def rounds_of(per_plan: dict, per_round: int, seen: list):
    """A ``measure`` that yields the given per-sequence KLs a round at a time and records
    how many rounds were taken."""
    def measure(plans):
        values = [per_plan[id(plan)] for plan in plans]
        for end in range(per_round, len(values[0]) + 1, per_round):
            seen.append(end)
            yield fake_kls([v[:end] for v in values], [10.0] * end)
    return measure


def test_choose_plan_keeps_the_lower_kl_and_the_candidate_on_a_tie():
    shape = adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config)
    a, b = (random_plan(shape, "x", "llama", seed=s) for s in (1, 2))
    seen: list[int] = []
    kls = {id(a): [0.3, 0.31, 0.29, 0.3], id(b): [0.2, 0.21, 0.19, 0.2]}
    chosen, record = choose_plan(a, b, rounds_of(kls, 4, seen))
    assert chosen is b and record == {"candidate": pytest.approx(0.3),
                                      "reference": pytest.approx(0.2), "chosen": "reference",
                                      "sequences": 4, "decisive": True, "per_sequence": {
                                          "candidate": pytest.approx(kls[id(a)]),
                                          "reference": pytest.approx(kls[id(b)])}}
    kls[id(a)] = kls[id(b)]
    chosen, record = choose_plan(a, b, rounds_of(kls, 4, seen))
    assert chosen is a and record["chosen"] == "candidate" and not record["decisive"]
    chosen, record = choose_plan(a, a, rounds_of(kls, 2, seen))
    assert chosen is a and record["sequences"] == 2        # identical plans: one round


def test_choose_plan_stops_at_the_first_decisive_round():
    shape = adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config)
    a, b = (random_plan(shape, "x", "llama", seed=s) for s in (1, 2))
    clear = {id(a): [1.0, 1.1, 0.9, 1.0] * 2, id(b): [1.2, 1.3, 1.1, 1.21] * 2}
    seen: list[int] = []
    assert choose_plan(a, b, rounds_of(clear, 4, seen))[1]["sequences"] == 4
    assert seen == [4]                                      # round 2 never measured
    noisy = {id(a): [1.0, 2.0, 0.5, 1.5, 1.0, 2.0, 0.5, 1.5],
             id(b): [1.5, 1.0, 1.0, 1.2, 1.1, 1.9, 0.7, 1.6]}
    seen.clear()
    chosen, record = choose_plan(a, b, rounds_of(noisy, 4, seen))
    assert seen == [4, 8] and record["sequences"] == 8 and not record["decisive"]
    assert chosen is (a if sum(noisy[id(a)]) <= sum(noisy[id(b)]) else b)


def test_decisive_is_a_two_sided_paired_t_test():
    zeros = torch.zeros(4, dtype=torch.float64)
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.46 < t(0.975, 2) = 4.303
    assert not decisive(base, base + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    # differences 1, 1.1, 0.9, 1.0: t = 1 / (0.0816 / 2) = 24.5 > t(0.995, 3) = 5.841
    diffs = torch.tensor([1.0, 1.1, 0.9, 1.0], dtype=torch.float64)
    assert decisive(zeros, diffs, confidence=0.99) and decisive(diffs, zeros, confidence=0.99)
    assert not decisive(base[:2], base[:2] + 1)                   # fewer than 3 sequences
    # differences m -+ sqrt(3)/2: sample sd 1, t = m / (1 / 2) = 2 m
    spread = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64) * 3 ** 0.5 / 2
    assert decisive(zeros, 1.65 + spread)            # t = 3.3 > t(0.975, 3) = 3.182
    assert not decisive(zeros, 1.55 + spread)        # t = 3.1
    assert not decisive(zeros, 1.65 + spread, confidence=0.99)   # t(0.995, 3) = 5.841
    assert decisive(zeros, 3.0 + spread, confidence=0.99)        # t = 6.0


def test_split_rounds_takes_whole_batches_and_folds_a_short_tail():
    batch = lambda n: (torch.zeros(n, 4), torch.ones(n, 4))    # noqa: E731
    sizes = lambda rounds: [[len(b[0]) for b in r] for r in rounds]  # noqa: E731
    assert sizes(split_rounds([batch(2)] * 4, 4)) == [[2, 2], [2, 2]]
    assert sizes(split_rounds([batch(2)] * 5, 4)) == [[2, 2], [2, 2, 2]]
    assert sizes(split_rounds([batch(3)] * 3, 4)) == [[3, 3, 3]]
    assert sizes(split_rounds([batch(2)], 4)) == [[2]]


def test_per_sequence_kls_match_brute_force():
    dense = tiny_model("llama")
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    student = pruned_copy(dense, adapter, random_plan(shape, "x", "llama", seed=2), None)
    *_, kls = calibration_rounds(dense, [student], [batches()[:1], batches()[1:]])
    want = []
    with torch.no_grad():
        for ids, mask in batches():
            p = torch.log_softmax(dense(input_ids=ids, attention_mask=mask).logits.double(), -1)
            q = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits.double(), -1)
            kl = ((p.exp() * (p - q)).sum(-1)[:, :-1] * mask[:, 1:]).sum(1)   # (B,)
            want += (kl / mask[:, 1:].sum(1)).tolist()
    assert kls.per_sequence(0).tolist() == pytest.approx(want, rel=1e-4)
    assert len(kls) == 3 and len(kls.head(2)) == 2


def test_flow_plans_are_never_worse_than_uniform_mlp_only_on_calibration_kl(
        prefect_api, tmp_path, monkeypatch):
    from flows.gprune_flow import gprune_flow
    from gprune.errors import ConfigError
    from gprune.maths.precision import resolve_precision
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
        assert 3 <= record["sequences"] <= 16 and isinstance(record["decisive"], bool)
        assert record["precision"] == resolve_precision("auto", "cpu") and not record["streamed"]
        assert "refine" not in store.read(key).extra    # the path stage refined
        plan = json.loads((store.path(key) / "plan.json").read_text())
        if record["chosen"] == "reference":       # every head kept, MLP uniform
            assert all(len(l["heads_keep"]) == plan["dense"]["heads"] for l in plan["layers"])
    art = store.read(next(iter(result["plans"].values())))
    from gprune.configs.allocate import AllocateConfig
    with pytest.raises(ConfigError, match="gprune stage gram"):
        run_allocate(AllocateConfig(sparsity=0.3, allocator="uniform", kl_check=True), store,
                     art.manifest["inputs"]["score"], art.manifest["inputs"]["stats"])
    surgery_reuses_the_checked_refits(store, art, monkeypatch)
    check_inputs_keep_a_small_dense_model(store, art, monkeypatch)
    the_path_refines_as_each_target_would(store, config, result)


def the_path_refines_as_each_target_would(store, flow_config: dict, result: dict) -> None:
    """gprune's path refines once per grid point (refine=1: one step on 16 x 128 tokens); at a
    target on the grid the allocate stage keeps exactly the counts a per-target refinement
    gives."""
    import pandas as pd

    from gprune.configs.pipeline import PipelineConfig
    from gprune.maths.allocate import project
    from gprune.maths.learned_path import path_fractions
    from gprune.methods.registry import build_method
    from tasks.allocate import build_plan, lsq_check_fits, stats_shape
    from tasks.allocate_refine import refine_allocation

    key = result["plans"]["gprune@0.2"]
    art = store.read(key)
    path = store.read(art.manifest["inputs"]["path"])
    grid = path.extra["refine"]["grid"]
    assert list(grid) == [str(s) for s in path.extra["grid"]]
    assert all(r["steps"] == 1 and r["sequences"] == 16 and r["extra"] >= 1 for r in grid.values())
    stats = store.read(art.manifest["inputs"]["stats"])
    scores = pd.read_parquet(store.read(art.manifest["inputs"]["score"]).file("scores.parquet"))
    shape = stats_shape(stats)
    config = PipelineConfig.build(**{k: v for k, v in flow_config.items() if k != "methods"}
                                  ).allocate_config(build_method("gprune"), 0.2)
    base = path_fractions(pd.read_parquet(path.file("path.parquet")), scores, shape, 0.2, False)
    _, alloc, record = refine_allocation(
        config, store, stats, shape, base, project(base, shape, 0.2, config.mlp_floor, False),
        lsq_check_fits(config, store, art.manifest["inputs"]["grams"]),
        lambda a: build_plan(config, stats, scores, a, shape, "gprune", "lsq", "x"))
    assert len(record["gains"][0]) == shape.num_layers
    modules = pd.read_parquet(art.file("modules.parquet"))
    kept = {(int(r.layer), int(r.module)): int(r.kept)
            for r in modules[modules.kind == "mlp"].itertuples()}
    assert kept == alloc.mlp_counts and kept != project(
        base, shape, 0.2, config.mlp_floor, False).mlp_counts


def check_inputs_keep_a_small_dense_model(store, plan: "Artifact", monkeypatch) -> None:
    """The targets of a sweep share the check's dense model (when it fits a memo's budget),
    its batches and its teacher; a larger model is loaded again for each target."""
    import tasks.learning as learning
    from gprune.configs.allocate import AllocateConfig

    stats = store.read(plan.manifest["inputs"]["stats"])
    config = AllocateConfig(sparsity=0.3, kl_check=True, check_sequences=3, check_seq_len=32,
                            device="cpu").check_config()
    learning._CHECKS.clear()
    first, second = (learning.check_inputs(config, store, stats) for _ in range(2))
    assert second[0] is first[0] and second[2] is first[2] and second[3] is first[3]
    monkeypatch.setattr("artifacts.memo.default_budget", lambda: 0)
    learning._CHECKS.clear()
    first, second = (learning.check_inputs(config, store, stats) for _ in range(2))
    assert second[0] is not first[0] and second[3] is first[3]
    assert all(torch.equal(a, b) for a, b in zip(first[0].parameters(), second[0].parameters()))


def surgery_reuses_the_checked_refits(store, plan: "Artifact", monkeypatch) -> None:
    """A plan's KL check (its Gram keys in any order) leaves its refits to the surgery of
    the same process, which then solves nothing and writes what a fresh solve writes."""
    import gprune.maths.surgery as surgery_maths
    import tasks.gram
    from gprune.configs.allocate import AllocateConfig
    from gprune.configs.surgery import SurgeryConfig
    from tasks.allocate import run_allocate
    from tasks.surgery import MODEL_DIR, run_surgery

    grams = sorted(plan.manifest["inputs"]["grams"], reverse=True)
    config = AllocateConfig(sparsity=0.3, allocator="uniform", prune_attention=False,
                            kl_check=True, check_sequences=3, check_seq_len=32, device="cpu")
    tasks.gram._DERIVED.clear()
    checked = run_allocate(config, store, plan.manifest["inputs"]["score"],
                           plan.manifest["inputs"]["stats"], reconstruct="lsq", gram_keys=grams)
    solved, solve = [], surgery_maths.lsq_refit
    monkeypatch.setattr(surgery_maths, "lsq_refit", lambda *a, **k: solved.append(1) or solve(*a, **k))
    surgery = SurgeryConfig(reconstruct="lsq", device="cpu")
    key = run_surgery(surgery, store, checked, None, gram_keys=grams)
    assert not solved
    weights = (store.path(key) / MODEL_DIR / "model.safetensors").read_bytes()
    tasks.gram._DERIVED.clear()
    assert run_surgery(surgery, store, checked, None, force=True, gram_keys=grams) == key
    assert solved and weights == (store.path(key) / MODEL_DIR / "model.safetensors").read_bytes()


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
    keeping = dense_teacher(dense, batches(), keep_bytes=2**30)   # terms kept for the next check
    assert calibration_kls(dense, together, batches(), keeping) == shared
    assert len(keeping.kept) == len(batches()) and not teacher.kept
    assert calibration_kls(dense, together, batches(), keeping) == shared


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
