"""Multiple-choice tasks: parsing, validation, lm-eval end to end offline, clear errors;
the shared-context scorer returns what lm-eval's own HFLM returns."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from gprune.errors import ConfigError, GpruneError
from gprune.eval import mc_tasks as mc
from gprune.eval.lm_eval_runner import prepare_tasks, run_mc_tasks
from gprune.eval.shared_context import PASS_OVERHEAD_TOKENS, SharedContextHFLM, passes
from gprune.maths.plan import LayerPlan, PruningPlan
from gprune.maths.surgery import apply_plan
from gprune.models.adapters import adapter_for
from gprune.models.loader import load_model
from gprune.models.pruned import finalize

VALID = [
    {"query": "Question: What color is the clear sky?\nAnswer:", "choices": ["blue", "green"],
     "gold": 0},
    {"query": "Question: How many legs has a cat?\nAnswer:", "choices": ["two", "four", "six"],
     "gold": 1},
    {"query": "Question: Opposite of hot?\nAnswer:", "choices": ["warm", "cold", "red"], "gold": 1},
    {"query": "Question: Ice is frozen what?\nAnswer:", "choices": ["water", "sand"], "gold": 0},
    {"query": "Question: Sun rises in the?\nAnswer:", "choices": ["west", "north", "east"],
     "gold": 2},
]
MALFORMED = [
    '{"query": "Q?", "choices": ["a", "b"], "gold": 5}',     # gold out of range
    '{"query": "Q?", "choices": ["a", "a"], "gold": 0}',     # duplicate options
    'not json at all',
]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, _ = load_model("tiny:llama")
    return model, tokenizer


def quiz_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose queries share a few token lengths (byte tokenizer: one token per
    character), so the shared-context scorer batches several contexts per pass."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "hat", "box", "sea", "owl", "ice", "fig"]
    rows = []
    for i in range(n):
        query = "Q: " + " ".join(rng.choice(words) for _ in range(2 + i % 3)) + "?\nA:"
        choices = rng.sample(["tall tree", "blue", "a warm red hat", "seven", "no", "ice fig"],
                             rng.choice([2, 3, 4]))
        rows.append({"query": query, "choices": choices, "gold": rng.randrange(len(choices))})
    return rows


def requests_of(rows: list[dict]) -> list[Instance]:
    return [Instance("loglikelihood", {}, (row["query"], " " + choice), i)
            for row in rows for i, choice in enumerate(row["choices"])]


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def direct_accuracy(model, tokenizer, rows) -> float:
    """argmax over summed log-likelihoods of " " + choice after the query (lm-eval's acc)."""
    correct = 0
    for row in rows:
        context = tokenizer(row["query"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
            targets = ids[0, len(context):]
            scores.append(logp[len(context) - 1:].gather(1, targets[:, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return correct / len(rows)


def test_parse_mmlu_and_siqa_rows():
    mmlu = {"question": "Which is a prime?\n\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:", "answer": "C"}
    assert mc.parse_mmlu(mmlu) == {"query": "Question: Which is a prime?\nAnswer:",
                                   "choices": ["4", "6", "7", "9"], "gold": 2}
    siqa = {"input": [{"role": "user", "content": "Kai ate. How would Kai feel? "
                       "A: full; B: hungry; C: sad."}], "ideal": "A"}
    assert mc.parse_siqa(siqa) == {"query": "Kai ate. How would Kai feel?\nAnswer:",
                                   "choices": ["full", "hungry", "sad"], "gold": 0}
    assert mc.parse_mmlu({**mmlu, "answer": "E"}) is None
    assert mc.parse_mmlu({"question": "no options here\nAnswer:", "answer": "A"}) is None
    assert mc.parse_siqa({**siqa, "ideal": "D"}) is None
    assert mc.parse_siqa({"input": []}) is None and mc.parse_siqa(["x"]) is None


def test_validation_skips_and_counts_malformed_rows():
    lines = [json.dumps(r) for r in VALID] + MALFORMED + [
        "", '{"query": "Q?", "choices": ["a", "b"], "gold": true}',
        '{"query": "", "choices": ["a", "b"], "gold": 0}', '{"query": "Q?", "choices": ["a"]}',
        '{"query": "Q?", "choices": ["a", 3], "gold": 0}', '[1, 2]']
    rows, skipped = mc.normalize_lines(lines, mc.validate_row)
    assert rows == VALID and skipped == len(MALFORMED) + 5


def test_written_task_yaml_points_at_its_data(tmp_path):
    built = mc.write_task("demo", VALID, 2, "acc_norm", tmp_path)
    spec = yaml.safe_load((built.folder / "demo.yaml").read_text())
    data = built.folder / "demo.jsonl"
    assert spec["task"] == "demo" and spec["output_type"] == "multiple_choice"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(data)
    assert [json.loads(line) for line in data.read_text().splitlines()] == VALID
    assert (built.examples, built.skipped, built.metric) == (5, 2, "acc_norm")
    assert mc.write_task("demo", VALID, 2, "acc_norm", tmp_path).folder == built.folder


def test_local_file_task_runs_offline_end_to_end(tiny, tmp_path):
    model, tokenizer = tiny
    path = write_jsonl(tmp_path / "My Quiz.jsonl", VALID, MALFORMED)
    [result] = run_mc_tasks(model, tokenizer, [str(path)], limit=None, device="cpu",
                            root=tmp_path / "tasks")
    assert result.task == "my_quiz" and result.metric == "acc"
    assert result.examples == len(VALID) and result.skipped == len(MALFORMED)
    assert 0.0 <= result.value <= 1.0
    assert result.value == pytest.approx(direct_accuracy(model, tokenizer, VALID))
    [limited] = run_mc_tasks(model, tokenizer, [str(path)], limit=3, device="cpu",
                             root=tmp_path / "tasks")
    assert limited.examples == 3
    assert limited.value == pytest.approx(direct_accuracy(model, tokenizer, VALID[:3]))


def test_file_with_no_valid_row_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [], MALFORMED)
    with pytest.raises(ConfigError, match="no valid rows"):
        prepare_tasks([str(path)], root=tmp_path)


def test_missing_task_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_tasks([str(tmp_path / "nope.jsonl")], root=tmp_path)


def test_hub_task_offline_names_local_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GpruneError) as err:
        prepare_tasks(["hellaswag"], root=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "hellaswag" in message
    assert "mmlu_local" in message and "siqa_local" in message and ".jsonl" in message


def test_hub_task_without_network_is_refused_and_with_it_passed_on(monkeypatch, tmp_path):
    import socket

    from gprune.eval import lm_eval_runner as runner

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(GpruneError, match="siqa_local"):
        prepare_tasks(["arc_easy"], root=tmp_path)
    monkeypatch.setattr(runner, "hub_reachable", lambda: True)
    path = write_jsonl(tmp_path / "quiz.jsonl", VALID)
    built, hub = prepare_tasks([str(path), "arc_easy"], root=tmp_path)
    assert [b.name for b in built] == ["quiz"] and hub == ["arc_easy"]


def test_local_task_from_the_evals_wheel(tmp_path):
    """Needs the evals wheel (downloaded once from PyPI into the cache)."""
    from gprune.data.wheels import find_wheel

    if find_wheel(*mc.EVALS) is None:
        pytest.skip("evals wheel not in the cache and no download in unit tests")
    built = mc.build_local_task("siqa_local", tmp_path)
    assert built.metric == "acc_norm" and built.examples + built.skipped == 2224
    assert 0 < built.skipped < 20


# ---- shared-context scoring -----------------------------------------------------
def assert_same_answers(got, reference):
    assert [greedy for _, greedy in got] == [greedy for _, greedy in reference]
    assert [score for score, _ in got] == pytest.approx([score for score, _ in reference],
                                                        rel=1e-5, abs=1e-5)


def test_shared_context_scores_equal_lm_evals_own(family):  # every family (conftest)
    model, tokenizer, _ = load_model(f"tiny:{family}")
    rows = quiz_rows(12) + [
        {"query": "Question: one letter?\nAnswer:", "choices": ["a", "b", "c"], "gold": 0},
        {"query": "Q: " + "long context " * 24, "choices": ["x", "yy"], "gold": 1}]  # > 256
    requests = requests_of(rows)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu",
                     batch_size=1).loglikelihood(requests, disable_tqdm=True)
    for batch_size in (1, 64):
        lm = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, device="cpu",
                               batch_size=batch_size)
        assert_same_answers(lm.loglikelihood(requests, disable_tqdm=True), reference)
        # every distinct context computed once (the over-long one goes to lm-eval's path)
        assert lm.stats["contexts"] == len({r["query"] for r in rows[:-1]})
        pairs = [lm._encode_pair(*req.args) for req in requests[:-2]]
        contexts = {tuple(context): len(context) for context, _ in pairs}
        assert lm.stats["tokens"] == sum(contexts.values()) + sum(len(c) - 1 for _, c in pairs)
        assert lm.stats["tokens"] < sum(len(a) + len(b) - 1 for a, b in pairs)  # lm-eval's


def test_shared_context_on_a_pruned_model_without_attention_in_layer_0():
    """The pruned code's empty attention block writes dummy cache entries; the cached
    continuation pass must still match lm-eval's full forward."""
    dense, tokenizer, adapter = load_model("tiny:llama")
    shape = adapter.shape(dense.config)
    rng = random.Random(3)
    layers = [LayerPlan.from_heads(0, rng.sample(range(shape.intermediate), 40), [], shape)]
    layers += [LayerPlan.from_heads(i, rng.sample(range(shape.intermediate), 50), [0, 2], shape)
               for i in range(1, shape.num_layers)]
    plan = PruningPlan("fp", adapter.name, "test", 0.5, shape, tuple(layers))
    pruned = copy.deepcopy(dense)
    finalize(pruned, adapter_for(pruned.config), apply_plan(pruned, adapter, plan))
    requests = requests_of(quiz_rows(8, seed=1))
    reference = HFLM(pretrained=pruned, tokenizer=tokenizer, device="cpu",
                     batch_size=4).loglikelihood(requests, disable_tqdm=True)
    got = SharedContextHFLM(pretrained=pruned, tokenizer=tokenizer, device="cpu",
                            batch_size=8).loglikelihood(requests, disable_tqdm=True)
    assert_same_answers(got, reference)


def test_batched_accuracy_equals_unbatched_exactly(tiny, tmp_path):
    model, tokenizer = tiny
    rows = quiz_rows(30, seed=2)
    path = write_jsonl(tmp_path / "quiz.jsonl", rows)
    kwargs = dict(limit=None, device="cpu", root=tmp_path / "tasks")
    plain = run_mc_tasks(model, tokenizer, [str(path)], batch_size=1, shared_context=False,
                         **kwargs)
    batched = run_mc_tasks(model, tokenizer, [str(path)], batch_size=32, **kwargs)
    one = run_mc_tasks(model, tokenizer, [str(path)], batch_size=1, **kwargs)
    assert batched == plain == one  # value, stderr, counts: all equal
    assert batched[0].value == direct_accuracy(model, tokenizer, rows)
    assert batched[0].examples == 30


def test_passes_cut_rows_at_least_cost_within_limits():
    def cost(chunks, widths):
        return sum(PASS_OVERHEAD_TOKENS + (hi - lo) * max(widths[lo], 1) for lo, hi in chunks)

    def all_cuts(lo, n):  # every split of rows lo..n-1 into contiguous passes
        if lo == n:
            yield []
        for hi in range(lo + 1, n + 1):
            for rest in all_cuts(hi, n):
                yield [(lo, hi), *rest]

    rng = random.Random(0)
    for _ in range(40):
        widths = sorted((rng.choice([0, 1, 2, 5, 9, 40, 150]) for _ in range(rng.randint(1, 9))),
                        reverse=True)
        max_rows, max_tokens = rng.randint(1, 5), rng.choice([50, 200, 1000])
        chunks = passes(widths, max_rows, max_tokens)
        assert [lo for lo, _ in chunks] == [0, *[hi for _, hi in chunks[:-1]]]
        assert chunks[-1][1] == len(widths)
        for lo, hi in chunks:
            assert hi - lo <= max_rows
            assert hi - lo == 1 or (hi - lo) * max(widths[lo], 1) <= max_tokens
        feasible = [c for c in all_cuts(0, len(widths)) if all(
            hi - lo <= max_rows and (hi - lo == 1 or (hi - lo) * max(widths[lo], 1) <= max_tokens)
            for lo, hi in c)]
        assert cost(chunks, widths) == min(cost(c, widths) for c in feasible)
