"""Evaluation stages: ``perplexity`` equals a direct computation and carries size/FLOPs,
``choice`` gives lm-eval's accuracies whatever the batch, ``speed`` rows (interleaved with
the dense source for a pruned model); each stage's key ignores the other stages' settings,
caching, tags, log lines instead of bars, the ``gprune stage`` commands."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import statistics

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from artifacts.store import artifact_key
from gprune.configs.choice import ChoiceConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.perplexity import PerplexityConfig
from gprune.configs.pipeline import PipelineConfig
from gprune.configs.speed import SpeedConfig
from gprune.data.corpus import sample_sequences
from gprune.errors import ConfigError
from gprune.eval.lm_eval_runner import run_mc_tasks
from gprune.eval.results import COLUMNS
from gprune.maths import evaluate as em
from gprune.models.loader import load_model, resolve_model
from tasks.choice import run_choice
from tasks.corpus import read_split, run_corpus
from tasks.perplexity import run_perplexity
from tasks.speed import run_speed

PPL = dict(ppl_tokens=96, seq_len=32, batch_size=2, device="cpu")
SPEED = dict(prefill_tokens=32, decode_tokens=2, repeats=1, device="cpu")
WORDS = "the cat sat on a mat while dogs ran past the old stone bridge".split()


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, adapter = load_model("tiny:llama")
    return model, tokenizer, adapter


def notes_file(folder):
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(12)]
    path = folder / "notes.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture
def corpus_key(store, tmp_path):
    return run_corpus(CorpusConfig(source=str(notes_file(tmp_path)), heldout_fraction=0.5), store)


def results(store, key, stage) -> pd.DataFrame:
    frame = pd.read_parquet(store.read(key, stage=stage).file("results.parquet"))
    assert list(frame.columns) == list(COLUMNS)
    return frame


def direct_nll(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL over real tokens, one window at a time, no padding fed."""
    total, count = 0.0, 0
    for row, row_mask in zip(ids, mask):
        length = int(row_mask.sum())
        with torch.no_grad():
            logits = model(input_ids=row[None, :length]).logits[0]
        total += F.cross_entropy(logits[:-1].double(), row[1:length], reduction="sum").item()
        count += length - 1
    return total, count


def test_window_nll_matches_direct_and_ignores_padding(tiny):
    model, _, _ = tiny
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # last window right-padded
    sums, counts = em.window_nll(model, ids, mask, batch_size=2)
    total, count = direct_nll(model, ids, mask)
    assert counts.tolist() == [19, 19, 13]
    assert sums.sum().item() == pytest.approx(total, rel=1e-5)
    result = em.perplexity_from_nll(sums, counts)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.tokens == count and result.windows == 3 and result.stderr > 0
    ids[2, 14:] = 7  # whatever sits under the padding must not matter
    again, _ = em.window_nll(model, ids, mask, batch_size=3)
    assert again.tolist() == pytest.approx(sums.tolist(), rel=1e-5)


def test_large_vocabularies_take_fewer_windows_per_pass(tiny, monkeypatch):
    assert em.windows_per_pass(4, 512, 49152) == 4                # SmolLM2: unchanged
    assert em.windows_per_pass(4, 512, 262144) == 2               # Gemma 3: 1 GiB of logits
    assert em.windows_per_pass(4, 4096, 262144) == 1
    model, _, _ = tiny
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    whole, _ = em.window_nll(model, ids, mask, batch_size=3)
    monkeypatch.setattr(em, "LOGITS_BUDGET", 20 * 260)           # one window per pass
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        one, _ = em.window_nll(model, ids, mask, batch_size=3)
    finally:
        hook.remove()
    assert len(calls) == 3 and one.tolist() == pytest.approx(whole.tolist(), rel=1e-6)


def test_stage_perplexity_equals_direct_computation(store, corpus_key, tiny, caplog):
    model, tokenizer, adapter = tiny
    with caplog.at_level(logging.INFO, logger="gprune"):
        key = run_perplexity(PerplexityConfig(**PPL), store, "tiny:llama", {"notes": corpus_key})
    art = store.read(key, stage="perplexity")
    frame = results(store, key, "perplexity")
    assert set(frame["kind"]) == {"ppl", "size"}  # no mc, no speed rows
    ppl = frame[frame["kind"] == "ppl"].iloc[0]
    ids, mask = sample_sequences(read_split(store, corpus_key, "heldout"), tokenizer, 3, 32, 0)
    total, count = direct_nll(model, ids, mask)
    assert ppl["name"] == "notes" and ppl["tag"] == "ood"  # dense: no calibration source
    assert int(ppl["n"]) == count
    assert ppl["value"] == pytest.approx(math.exp(total / count), rel=1e-5)
    size = frame[frame["kind"] == "size"].set_index("name")["value"]
    assert size["params"] == em.parameter_counts(model, adapter)["params"]
    assert size["flops_per_token"] == pytest.approx(em.flops_per_token(model, adapter, 16.5))
    assert art.extra["method"] == "dense" and art.extra["target_sparsity"] == 0.0
    assert art.manifest["inputs"]["model"] == resolve_model("tiny:llama").fingerprint
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("perplexity: notes (3 windows x 32 tokens)") for m in messages)


def test_dense_is_evaluated_once(store, corpus_key, monkeypatch):
    config = PerplexityConfig(**PPL)
    first = run_perplexity(config, store, "tiny:llama", {"notes": corpus_key})
    import tasks.perplexity as stage

    def boom(*args, **kwargs):
        raise AssertionError("the dense model was evaluated twice")

    monkeypatch.setattr(stage, "load_checkpoint", boom)
    assert run_perplexity(config, store, "tiny:llama", {"notes": corpus_key}) == first
    with pytest.raises(AssertionError):
        run_perplexity(config, store, "tiny:llama", {"notes": corpus_key}, force=True)


def test_perplexity_is_kept_when_only_choice_or_speed_settings_change(store, corpus_key,
                                                                       monkeypatch):
    """Each budget enters its own stage's key only: new multiple-choice and speed settings
    leave the perplexity config and key unchanged, and the second run reuses the artifact."""
    base = PipelineConfig(eval_tokens=96, eval_seq_len=32, mc_tasks=["a.jsonl"], mc_limit=5,
                          speed=False, device="cpu")
    changed = base.model_copy(update={"mc_tasks": ["b.jsonl", "c.jsonl"], "mc_limit": 50,
                                      "speed": True})
    assert base.speed_config() is None and changed.speed_config() is not None
    assert base.choice_config() != changed.choice_config()
    assert base.model_copy(update={"mc_tasks": []}).choice_config() is None
    assert changed.perplexity_config() == base.perplexity_config()
    first = run_perplexity(base.perplexity_config(), store, "tiny:llama", {"notes": corpus_key})
    manifest = store.path(first) / "manifest.json"
    written = manifest.stat().st_mtime_ns
    import tasks.perplexity as stage

    monkeypatch.setattr(stage, "load_checkpoint", lambda *a: pytest.fail("recomputed"))
    again = run_perplexity(changed.perplexity_config(), store, "tiny:llama",
                           {"notes": corpus_key})
    assert again == first and manifest.stat().st_mtime_ns == written
    assert base.model_copy(update={"eval_tokens": 64}).perplexity_config() != \
        base.perplexity_config()  # its own budget does change it


def fake_surgery(store, calibration: list[str], **extra) -> str:
    """A surgery artifact holding a copy of the tiny model, with run metadata."""
    spec = {"model": "x", "inputs": {"plan": "fake"}, "params": {"c": calibration, **extra}}
    key = artifact_key("surgery", spec)
    with store.write(key, "surgery", spec) as pending:
        shutil.copytree(resolve_model("tiny:llama").path, pending.file("model"))
        pending.extra.update({"method": "wanda_sp", "target_sparsity": 0.3,
                              "source_spec": "tiny:llama", "calibration_sources": calibration,
                              **extra})
    return key


def test_surgery_checkpoint_tags_in_distribution(store, corpus_key):
    key = fake_surgery(store, ["notes"])
    ev = store.read(run_perplexity(PerplexityConfig(**PPL), store, key, {"notes": corpus_key}))
    frame = pd.read_parquet(ev.file("results.parquet"))
    assert frame.loc[frame["kind"] == "ppl", "tag"].tolist() == ["in"]
    assert ev.extra["method"] == "wanda_sp" and ev.extra["target_sparsity"] == 0.3
    assert ev.extra["calibration_sources"] == ["notes"] and ev.extra["model"] == "tiny:llama"
    assert ev.manifest["inputs"]["model"] == key


def test_size_and_flops_follow_the_shape(tiny):
    model, _, adapter = tiny
    h, i, layers, vocab, q, kv = 64, 96, 3, 260, 4 * 16, 2 * 16
    prunable = layers * (3 * h * i + 2 * h * q + 2 * h * kv)
    counts = em.parameter_counts(model, adapter)
    assert counts["prunable_params"] == prunable
    assert counts["params"] - counts["params_non_embedding"] == vocab * h
    flops = em.flops_per_token(model, adapter, context=10.0)
    assert flops == pytest.approx(2 * (prunable + vocab * h) + layers * 4 * 10.0 * q)


def test_window_longer_than_the_model_is_clamped(store, corpus_key):
    config = PerplexityConfig(**{**PPL, "seq_len": 4096, "ppl_tokens": 300})
    ev = store.read(run_perplexity(config, store, "tiny:llama", {"notes": corpus_key}))
    assert ev.extra["seq_len_used"] == 256  # tiny models have 256 positions
    speed = store.read(run_speed(SpeedConfig(**{**SPEED, "prefill_tokens": 4096}), store,
                                 "tiny:llama"))
    assert speed.extra["prefill_tokens_used"] == 256


@pytest.mark.parametrize("cls, bad", [
    (PerplexityConfig, dict(ppl_tokens=0)), (PerplexityConfig, dict(seq_len=1)),
    (PerplexityConfig, dict(device="tpu")), (PerplexityConfig, dict(mc_limit=5)),
    (ChoiceConfig, dict(mc_limit=0)), (ChoiceConfig, dict(mc_tasks=("a", "a"))),
    (ChoiceConfig, dict(mc_tasks=(" ",))), (ChoiceConfig, dict(mc_tasks=())),
    (ChoiceConfig, dict(seq_len=64)), (SpeedConfig, dict(repeats=0)),
    (SpeedConfig, dict(decode_tokens=0)), (SpeedConfig, dict(ppl_tokens=64))])
def test_bad_config_is_one_line_error(cls, bad):
    with pytest.raises(ConfigError) as err:
        cls.build(**bad)
    assert "\n" not in str(err.value) and str(err.value).startswith(cls.__name__)


def test_multiple_choice_through_the_stage(store, tiny, tmp_path, monkeypatch, caplog):
    """The stage's mc rows are lm-eval's accuracies (whatever mc_batch_size), and without a
    terminal each measurement is one log line (no progress bars)."""
    model, tokenizer, _ = tiny
    rows = [{"query": f"Q: item {i} is?\nA:", "choices": ["odd", "even", "neither"][:2 + i % 2],
             "gold": i % 2} for i in range(12)]
    path = tmp_path / "parity.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import gprune.eval.lm_eval_runner as runner
    import tasks.choice as stage

    monkeypatch.setattr(runner, "tasks_root", lambda: tmp_path / "tasks")
    monkeypatch.setattr(stage, "progress_bars", lambda: False)
    frames, keys = [], []
    for mc_batch_size in (1, 16):
        config = ChoiceConfig(mc_tasks=(str(path),), mc_batch_size=mc_batch_size, device="cpu")
        with caplog.at_level(logging.INFO, logger="gprune"):
            keys.append(run_choice(config, store, "tiny:llama"))
        frame = results(store, keys[-1], "choice")
        assert set(frame["kind"]) == {"mc"}
        frames.append(frame)
    assert keys[0] != keys[1]  # every ChoiceConfig field is in the key
    pd.testing.assert_frame_equal(frames[0], frames[1])
    [direct] = run_mc_tasks(model, tokenizer, [str(path)], limit=None, device="cpu",
                            shared_context=False, batch_size=1, root=tmp_path / "tasks")
    mc = frames[0].iloc[0]
    assert (mc["name"], mc["metric"], mc["value"], int(mc["n"]), mc["tag"]) == (
        "parity", "acc", direct.value, 12, "ood")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("choice: ") and "loglikelihood requests (12 contexts" in m
               for m in messages)
    path.write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    assert run_choice(config, store, "tiny:llama") != keys[1]  # an edited file: a new key


def speed_rows(store, key) -> pd.DataFrame:
    frame = results(store, key, "speed")
    assert set(frame["kind"]) == {"speed"}
    return frame.set_index("name")


def test_pruned_speed_is_timed_interleaved_with_its_dense_source(store, caplog):
    dense_fp = resolve_model("tiny:llama").fingerprint
    key = fake_surgery(store, ["notes"], source_fingerprint=dense_fp)
    config = SpeedConfig(**{**SPEED, "repeats": 2})
    speed = speed_rows(store, run_speed(config, store, key))
    assert set(speed.index) == {"prefill_tokens_per_s", "decode_tokens_per_s",
                                "prefill_speedup", "decode_speedup"}
    assert (speed["value"] > 0).all()
    assert speed.loc["prefill_speedup", "metric"] == "ratio"
    assert speed.loc["prefill_speedup", "n"] == 2  # paired repeats
    assert speed.loc["prefill_tokens_per_s", "n"] == 2 * 32  # prefill tokens per repeat
    assert store.read(run_speed(config, store, key)).extra["method"] == "wanda_sp"
    dense = speed_rows(store, run_speed(config, store, "tiny:llama"))
    assert set(dense.index) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    # a source spec that now names other weights: no reference, a warning, no speedup rows
    stale = fake_surgery(store, ["notes"], source_fingerprint="0" * 16)
    with caplog.at_level(logging.WARNING, logger="gprune"):
        speed = speed_rows(store, run_speed(config, store, stale))
    assert set(speed.index) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert any("no speedup over dense" in r.getMessage() for r in caplog.records)


def test_measure_speeds_interleaves_and_pairs_repeats(tiny, monkeypatch):
    """Runs alternate with the order rotating; speedups pair runs of the same repeat."""
    model, _, _ = tiny
    fast, slow = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    order = []
    times = {id(fast): [1.0, 1.0, 0.5, 1.0, 2.0], id(slow): [2.0, 2.0, 2.0, 2.0, 2.0]}

    def fake_run(m, ids, decode_tokens):
        order.append("fast" if m is fast else "slow")
        return times[id(m)].pop(0), 2.0  # decode: equal for both

    monkeypatch.setattr(em, "_one_speed_run", fake_run)
    fast.config = slow.config = model.config
    out = em.measure_speeds({"slow": slow, "fast": fast}, 8, 4, repeats=4)
    assert order == ["slow", "fast",                      # warm-up, untimed
                     "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    assert out["fast"]["prefill_speedup"][0] == pytest.approx(statistics.median([2, 4, 2, 1]))
    assert out["fast"]["decode_speedup"][0] == pytest.approx(1.0)
    assert out["slow"]["prefill_tokens_per_s"][0] == pytest.approx(4.0)  # 8 tokens / 2 s
    assert "prefill_speedup" not in out["slow"]


def test_stage_commands(store, tmp_path, capsys):
    """``gprune stage --help`` lists the three evaluation stages, ``gprune stage perplexity
    --help`` works, and perplexity + speed keys of one model make one report run."""
    from gprune import cli

    helps = []
    for argv in (["stage", "--help"], ["stage", "perplexity", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
        helps.append(capsys.readouterr().out)
    listed = re.findall(r"^    (\w+)(?: |$)", helps[0], flags=re.M)
    start = listed.index("perplexity")
    assert listed[start:start + 3] == ["perplexity", "choice", "speed"]
    assert listed[-1] == "report"    # the NSA stages (neurons, attribution) come before it
    assert "evaluate" not in listed
    assert "--tokens" in helps[1] and "--seq-len" in helps[1] and "--mc-limit" not in helps[1]
    keys = []
    for argv in (["perplexity", "--sources", str(notes_file(tmp_path)), "--tokens", "64",
                  "--seq-len", "32"], ["speed", "--prefill-tokens", "16", "--repeats", "1"]):
        assert cli.main(["-q", "--store", str(store.root), "stage", *argv, "--model",
                         "tiny:llama", "--device", "cpu"]) == 0
        keys.append(capsys.readouterr().out.splitlines()[0])
    assert [k.split("-")[0] for k in keys] == ["perplexity", "speed"]
    assert cli.main(["-q", "--store", str(store.root), "stage", "report", "--evals", *keys]) == 0
    report = store.read(capsys.readouterr().out.splitlines()[0], stage="report")
    table = pd.read_parquet(report.file("results.parquet"))
    assert table["run"].nunique() == 1 and set(table["kind"]) == {"ppl", "size", "speed"}
    assert set(table["artifact"]) == set(keys)
