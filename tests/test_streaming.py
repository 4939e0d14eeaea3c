"""Layer-streamed passes equal the in-memory ones; bad input refused in one line.

Every family's tiny model (GQA; Gemma 3 with windows longer than its sliding window), with
padded rows: the streamed capture moments, per-layer cosines and Grams, and the streamed
perplexity (dense, and saved pruned checkpoints), against the in-memory passes (1e-6
relative); the capture, gram and perplexity stages, and the plans allocated from streamed
captures, with ``stream=on`` against ``stream=off``; spilling hidden states to disk changes
nothing. Bad input through the CLI: one line, non-zero exit, no artifact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.gram import GramConfig
from gprune.maths.calibrate import capture_with_grams, streamed_statistics
from gprune.maths.capture import NonFiniteActivationError
from gprune.maths.evaluate import window_nll
from gprune.maths.streaming import streamed_window_nll
from gprune.models.loader import load_model, resolve_model
from gprune.models.streamed import MEMORY_ENV, StreamedModel, should_stream
from tests.synthetic import nan_model, no_hooks, synthetic_grams

RTOL = 1e-6
COLUMNS = ["count", "sum", "sumsq", "sum_abs", "active"]


def close(got, want) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * float(np.abs(want).max()))


def batch(vocab: int = 256, rows: int = 5, width: int = 40):
    """(input_ids, attention_mask) (rows, width); rows 1 and 4 padded at the end."""
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[4, 10:] = 0
    return ids, mask


@pytest.mark.parametrize("spill", [None, 0])
def test_streamed_capture_and_grams_equal_in_memory(family, spill):
    if spill == 0 and family not in ("gemma3", "llama"):
        pytest.skip("spilling is family-independent: two families suffice")
    ref = resolve_model(f"tiny:{family}")
    model, _, adapter = load_model(ref)
    ids, mask = batch()
    want, want_grams = capture_with_grams(model, adapter, ids, mask, 2, progress=False)
    streamed = StreamedModel(ref.path, head=False)     # as the capture and gram stages run
    got, got_grams = streamed_statistics(streamed, ids, mask, 2, grams=True, spill_bytes=spill)
    embedding = streamed.model.get_input_embeddings().weight
    assert embedding.is_meta         # only the batches' rows were ever read
    assert got.tokens == want.tokens == got_grams.tokens == int(mask.sum())
    close(got.channels[COLUMNS], want.channels[COLUMNS])
    close(got.layers[["cosine_sum", "cosine_count"]], want.layers[["cosine_sum", "cosine_count"]])
    for layer in range(want_grams.num_layers):
        for kind, gram in want_grams.layer(layer).items():
            close(got_grams.layer(layer)[kind], gram)
    assert no_hooks(streamed.model)
    assert all(p.is_meta for layer in streamed.layers for p in layer.parameters())


def test_streamed_perplexity_equals_in_memory(family):
    ref = resolve_model(f"tiny:{family}")
    model, _, _ = load_model(ref)
    ids, mask = batch()
    want_sums, want_counts = window_nll(model, ids, mask, 2)
    sums, counts = streamed_window_nll(StreamedModel(ref.path), ids, mask, 2, spill_bytes=0)
    assert torch.equal(counts, want_counts)
    close(sums, want_sums)


def test_non_finite_activation_names_the_layer(tmp_path):
    model, _ = nan_model("llama")
    model.save_pretrained(tmp_path)
    ids, mask = batch()
    with pytest.raises(NonFiniteActivationError, match="layer 1 of source 'x'") as err:
        streamed_statistics(StreamedModel(tmp_path), ids, mask, 2, label="x")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with one short local source, ``fox.txt``."""
    root = tmp_path_factory.mktemp("streaming")
    (root / "fox.txt").write_text("".join(f"The quick brown fox number {i} jumps over the "
                                          "dog.\n\n" for i in range(40)))
    return root


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_capture_and_gram_stages_streamed_equal_in_memory(family, corpus, tmp_path):
    import pandas as pd

    from artifacts.store import ArtifactStore
    from tasks.capture import run_capture
    from tasks.corpus import run_corpus
    from tasks.gram import read_gram, run_gram

    model = f"tiny:{family}"
    results = {}
    for stream in ("off", "on"):
        store = ArtifactStore(tmp_path / stream)
        corpus_key = run_corpus(CorpusConfig(source=str(corpus / "fox.txt")), store)
        config = CaptureConfig(source="fox", n_sequences=3, seq_len=48, batch_size=2,
                               device="cpu", stream=stream)
        capture = store.read(run_capture(config, store, model, corpus_key,
                                         gram=GramConfig.from_capture(config)))
        gram_key = run_gram(GramConfig.from_capture(config), store, model, corpus_key)
        joint = [read_gram(store, gram_key, i) for i in range(3)]   # the capture's pass
        assert run_gram(GramConfig.from_capture(config), store, model, corpus_key,
                        force=True) == gram_key                     # the gram stage's own
        assert capture.extra["streamed"] == (stream == "on")
        results[stream] = (capture, joint, [read_gram(store, gram_key, i) for i in range(3)])
    off, on = results["off"], results["on"]
    assert on[0].key == off[0].key   # stream is an execution setting, not part of the key
    close(pd.read_parquet(on[0].file("channels.parquet"))[COLUMNS],
          pd.read_parquet(off[0].file("channels.parquet"))[COLUMNS])
    for grams in (on[1], on[2], off[2]):
        for got, want in zip(grams, off[1], strict=True):
            for kind in want:
                close(got[kind], want[kind])


def test_auto_streams_when_the_weights_exceed_the_free_memory(monkeypatch):
    path = resolve_model("tiny:llama").path
    monkeypatch.setenv(MEMORY_ENV, "1000")
    assert should_stream("auto", path, "cpu") and should_stream("on", path, "cpu")
    assert not should_stream("off", path, "cpu")
    monkeypatch.setenv(MEMORY_ENV, str(10**12))
    assert not should_stream("auto", path, "cpu")


def test_the_pipeline_passes_stream_to_capture_gram_and_perplexity():
    from gprune.configs.pipeline import PipelineConfig

    config = PipelineConfig(model="tiny:llama", stream="on")
    capture = config.capture_config("wikipedia")
    assert capture.stream == "on" and GramConfig.from_capture(capture).stream == "on"
    assert config.perplexity_config().stream == "on"
    assert "stream" not in capture.params() and "stream" not in config.perplexity_config().params()
    from gprune.methods.registry import build_method

    allocate = config.allocate_config(build_method("gprune"), 0.3)
    assert allocate.stream == "on" and "stream" not in allocate.key_params()
    assert "stream" not in allocate.path_params()
    surgery = config.surgery_config(build_method("gprune"))
    assert surgery.stream == "on" and "stream" not in surgery.params()


def cli_capture(root, corpus_path, model, capsys, *extra) -> tuple[int, str]:
    from gprune.cli import main

    capsys.readouterr()   # what came before
    code = main(["-q", "--store", str(root / "cli"), "stage", "capture", "--source",
                 str(corpus_path), "--model", str(model), "--n-sequences", "2", "--seq-len",
                 "32", "--device", "cpu", *extra])
    return code, capsys.readouterr().err.strip()


def test_bad_input_one_line_errors_and_nothing_written(corpus, tmp_path, capsys, monkeypatch):
    import shutil

    root = corpus
    tiny = resolve_model("tiny:llama").path
    no_safetensors = tmp_path / "bin-model"
    shutil.copytree(tiny, no_safetensors)
    state = load_model(tiny)[0].state_dict()
    (no_safetensors / "model.safetensors").unlink()
    torch.save(state, no_safetensors / "pytorch_model.bin")
    code, err = cli_capture(tmp_path, root / "fox.txt", no_safetensors, capsys, "--stream", "on")
    assert code != 0 and len(err.splitlines()) == 1
    assert "no" in err and ".safetensors" in err and "convert" in err

    monkeypatch.setenv(MEMORY_ENV, "100000")
    code, err = cli_capture(tmp_path, root / "fox.txt", tiny, capsys, "--stream", "on")
    assert code != 0 and len(err.splitlines()) == 1
    assert "does not fit" in err and "one layer at a time" in err and "GB" in err
    assert not (tmp_path / "cli" / "capture").exists() or \
        not any((tmp_path / "cli" / "capture").iterdir())


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "starcoder2"])
def test_pruned_checkpoint_streamed_perplexity_equals_in_memory(family, tmp_path):
    """A saved pruned checkpoint (per-layer widths; its last layer without attention)."""
    from gprune.models.pruned import save_pruned
    from tests.test_surgery import pruned_in_memory

    _, pruned, _ = pruned_in_memory(family, last_without_attention=True)
    save_pruned(pruned, None, tmp_path / "ckpt", {"test": True})
    model, _, _ = load_model(tmp_path / "ckpt")
    ids, mask = batch()
    want_sums, want_counts = window_nll(model, ids, mask, 2)
    sums, counts = streamed_window_nll(StreamedModel(tmp_path / "ckpt"), ids, mask, 2)
    assert torch.equal(counts, want_counts)
    close(sums, want_sums)


def test_perplexity_stage_streamed_equals_in_memory(corpus, tmp_path):
    """Same key, same rows (perplexity, sizes, FLOPs) with stream on and off."""
    import pandas as pd

    from artifacts.store import ArtifactStore
    from gprune.configs.perplexity import PerplexityConfig
    from tasks.corpus import run_corpus
    from tasks.perplexity import run_perplexity

    frames, keys = {}, {}
    for stream in ("off", "on"):
        store = ArtifactStore(tmp_path / stream)
        corpus_key = run_corpus(CorpusConfig(source=str(corpus / "fox.txt"),
                                             heldout_fraction=0.5), store)
        config = PerplexityConfig(ppl_tokens=96, seq_len=32, batch_size=2, device="cpu",
                                  stream=stream)
        keys[stream] = run_perplexity(config, store, "tiny:gemma3", {"fox": corpus_key})
        art = store.read(keys[stream], stage="perplexity")
        assert art.extra["streamed"] == (stream == "on")
        frames[stream] = pd.read_parquet(art.file("results.parquet"))
    assert keys["on"] == keys["off"]
    assert list(frames["on"]["name"]) == list(frames["off"]["name"])
    close(frames["on"]["value"], frames["off"]["value"])


def test_plans_from_streamed_captures_equal_in_memory(tmp_path):
    """capture and gram (stream on / off) -> stats -> partition -> score -> allocate, also
    with the allocate stage's KL check streamed: equal plans and equal KLs."""
    from artifacts.store import ArtifactStore
    from gprune.configs.allocate import AllocateConfig
    from gprune.configs.stats import StatsConfig
    from gprune.maths.plan import PruningPlan
    from gprune.methods.registry import build_method
    from tasks.allocate import run_allocate
    from tasks.capture import run_capture
    from tasks.corpus import run_corpus
    from tasks.gram import run_gram
    from tasks.stats import run_stats
    from tests.test_stage_chain import TEXTS, plan_for

    plans, checks = {}, {}
    for stream in ("off", "on"):
        store = ArtifactStore(tmp_path / stream)
        captures, grams = [], []
        for name, text in TEXTS.items():
            path = tmp_path / f"{name}.txt"
            path.write_text("".join(f"{text.strip()} ({i})\n\n" for i in range(60)))
            corpus = run_corpus(CorpusConfig(source=str(path)), store)
            config = CaptureConfig(source=name, n_sequences=4, seq_len=48, batch_size=2,
                                   device="cpu", stream=stream)
            captures.append(run_capture(config, store, "tiny:qwen2", corpus))
            grams.append(run_gram(GramConfig.from_capture(config), store, "tiny:qwen2", corpus))
        stats = run_stats(StatsConfig(), store, captures)
        key = plan_for(store, stats, build_method("gprune"), 0.3)
        plans[stream] = PruningPlan.read(store.read(key).path).layers
        plan = store.read(key)
        checked = run_allocate(
            AllocateConfig(sparsity=0.4, allocator="uniform", prune_attention=True,
                           kl_check=True, check_sequences=2, check_seq_len=32, device="cpu",
                           stream=stream, check_precision="float32"),   # as streamed runs
            store, plan.manifest["inputs"]["score"], stats, method="gprune",
            reconstruct="lsq", gram_keys=grams)
        checks[stream] = store.read(checked).extra["kl_check"]
    assert plans["on"] == plans["off"]
    assert checks["on"]["streamed"] and not checks["off"]["streamed"]
    assert checks["on"]["chosen"] == checks["off"]["chosen"]
    for side in ("candidate", "reference"):
        assert checks["on"][side] == pytest.approx(checks["off"][side], rel=1e-5)
        assert checks["on"][side] > 0


def test_streamed_kl_check_equals_in_memory(family):
    """The allocate stage's KL check streamed: both plans (one removes a layer's attention
    entirely) with the lsq refit give the in-memory KLs."""
    from gprune.maths.plan_check import calibration_kls, pruned_copies
    from gprune.maths.streamed_check import streamed_kls
    from gprune.maths.surgery import lsq_fits
    from tests.test_surgery import random_plan

    ref = resolve_model(f"tiny:{family}")
    model, _, adapter = load_model(ref)
    shape = adapter.shape(model.config)
    plans = [random_plan(shape, "x", family, seed=s) for s in (1, 2)]
    fits = lsq_fits(synthetic_grams(shape), 1e-3, [])
    ids, mask = batch()
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    want = calibration_kls(model, pruned_copies(model, adapter, plans, fits), batches)
    got = streamed_kls(StreamedModel(ref.path), plans, fits, batches)
    assert got == pytest.approx(want, rel=1e-5) and min(got) > 0
