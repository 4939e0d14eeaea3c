"""Gram stage: Grams equal brute force over materialized activations; bad input refused.

Brute force: our own forward pre-hooks keep every input of the output projections, the
real tokens' rows are stacked as X (n, d), and [X, 1]^T [X, 1] is formed in float64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gprune.configs.capture import CaptureConfig
from gprune.configs.corpus import CorpusConfig
from gprune.configs.gram import GramConfig
from gprune.errors import ArtifactError, ConfigError
from gprune.maths.gram import (GramCapture, NonFiniteGramError, accumulate_grams, gram_bytes,
                               gram_dims, gram_flops_per_token, update_macs)
from gprune.models.adapters import adapter_for
from gprune.models.loader import resolve_model
from gprune.models.tiny import tiny_model
from tests.synthetic import nan_model, no_hooks
from tasks.capture import ShortSourceWarning, run_capture
from tasks.corpus import run_corpus
from tasks.gram import check_gram_matches, pooled_gram, read_gram, run_gram

SETTINGS = dict(n_sequences=4, seq_len=160, batch_size=2)   # 541 tokens: row 4 padded


class Recorder:
    """Every input of every layer's MLP and attention output projection (test-only)."""

    def __init__(self, model, adapter):
        self.data = {"mlp": {}, "attn": {}}
        self.handles = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            for kind, module in (("mlp", adapter.mlp_output(layer)),
                                 ("attn", adapter.attn_output(layer))):
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, kind=kind, i=i: self.data[kind].setdefault(i, []).append(
                        args[0].double().clone())))

    def gram(self, kind, layer, mask, batch_size) -> torch.Tensor:
        """[X, 1]^T [X, 1] over the non-padding tokens of every batch, float64."""
        batches = [b for b in mask.split(batch_size) if b.any()]
        rows = [act[b[:, :act.shape[1]].bool()]                              # (n_b, d)
                for act, b in zip(self.data[kind][layer], batches, strict=True)]
        x = torch.cat(rows)                                                  # (n, d)
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (n, d+1)
        return x1.T @ x1                                                     # (d+1, d+1)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=rtol,
                               atol=rtol * float(want.abs().max()))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A module store with two short local sources (the last calibration row is padded)."""
    from artifacts.store import ArtifactStore

    root = tmp_path_factory.mktemp("gram")
    store = ArtifactStore(root / "store")
    keys = {}
    for name, text in (("fox", "The quick brown fox number {i} jumps over the lazy dog."),
                       ("code", "def f{i}(a, b):\n    return a * {i} + b  # sum")):
        path = root / f"{name}.txt"
        path.write_text("".join(text.format(i=i) + "\n\n" for i in range(12)))
        keys[name] = run_corpus(CorpusConfig(source=str(path)), store)
    return store, keys


@pytest.fixture
def spy(monkeypatch):
    """Hook the model the gram stage loaded with a Recorder (brute force of its own pass)."""
    import tasks.gram as task

    real, seen = task.accumulate_grams, {}

    def recorded(model, adapter, input_ids, attention_mask, batch_size, **kwargs):
        recorder = Recorder(model, adapter)
        try:
            result = real(model, adapter, input_ids, attention_mask, batch_size, **kwargs)
        finally:
            recorder.remove()
        seen.update(recorder=recorder, mask=attention_mask, batch_size=batch_size,
                    model=model)
        return result

    monkeypatch.setattr(task, "accumulate_grams", recorded)
    return seen


def gram_of(store, corpus, model, source="fox", **overrides):
    config = GramConfig(source=source, device="cpu", **{**SETTINGS, **overrides})
    with pytest.warns(ShortSourceWarning):
        return run_gram(config, store, model, corpus, force=True)


def test_stage_gram_equals_brute_force(family, corpora, spy):
    store, corpora_keys = corpora
    key = gram_of(store, corpora_keys["fox"], f"tiny:{family}", storage_dtype="float64")
    mask, recorder = spy["mask"], spy["recorder"]
    assert (mask == 0).any() and mask[-1].any()   # a padded row shares its batch
    art = store.read(key, stage="gram")
    tokens = int(mask.sum())
    assert art.extra["tokens"] == tokens == 541 and art.extra["storage_dtype"] == "float64"
    shape = art.extra["shape"]
    assert shape["kv_heads"] < shape["heads"]     # GQA
    assert no_hooks(spy["model"])
    for layer in range(shape["num_layers"]):
        grams = read_gram(store, key, layer)
        for kind, width in (("mlp", shape["intermediate"]),
                            ("attn", shape["heads"] * shape["head_dim"])):
            got = grams[kind]
            assert got.dtype == torch.float64 and got.shape == (width + 1, width + 1)
            assert torch.equal(got, got.T) and got[-1, -1] == tokens
            assert_close(got, recorder.gram(kind, layer, mask, spy["batch_size"]), 1e-9)
            assert art.extra["layers"][layer][f"{kind}_finite"]


def test_float32_storage_rounds_the_float64_accumulator(corpora, spy):
    store, corpora_keys = corpora
    key64 = gram_of(store, corpora_keys["fox"], "tiny:llama", storage_dtype="float64")
    key32 = gram_of(store, corpora_keys["fox"], "tiny:llama")      # the default
    assert key32 != key64 and store.read(key32).extra["storage_dtype"] == "float32"
    assert store.read(key32).extra["bytes"] < 0.51 * store.read(key64).extra["bytes"]
    for layer in range(3):
        g32, g64 = read_gram(store, key32, layer), read_gram(store, key64, layer)
        brute = spy["recorder"].gram("mlp", layer, spy["mask"], spy["batch_size"])
        assert torch.equal(g32["mlp"], g64["mlp"].float().double())
        assert_close(g32["mlp"], brute, 2.0**-24 * 1.01)


@pytest.mark.parametrize("leaf", [8, 10**6])   # deep upper-triangle recursion; one addmm
def test_padding_chunks_and_triangular_updates(leaf):
    model = tiny_model("qwen2")   # attention biases, GQA
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (5, 24), generator=gen)
    mask = torch.ones(5, 24, dtype=torch.long)
    mask[2, 10:], mask[3, 5:], mask[4, :] = 0, 0, 0   # batch 2 has trailing padding columns
    recorder = Recorder(model, adapter)
    try:   # blocks of 64 rows: several chunks per hook call
        with GramCapture(model, adapter, leaf, chunk_elements=64 * 97) as capture:
            added = [capture.forward(ids[s:s + 2], mask[s:s + 2]) for s in (0, 2, 4)]
    finally:
        recorder.remove()
    assert added == [48, 15, 0] and capture.tokens == 63 and no_hooks(model)
    for layer in range(3):
        for kind, got in capture.matrices(layer).items():
            assert_close(got, recorder.gram(kind, layer, mask, 2), 1e-9)


def test_nan_is_an_error_naming_layer_kind_and_source_and_hooks_are_removed():
    model, adapter = nan_model()
    ids, mask = torch.randint(0, 256, (4, 16)), torch.ones(4, 16, dtype=torch.long)
    with pytest.raises(NonFiniteGramError, match=r"mlp Gram .* of layer 1 of source 'wiki'"):
        accumulate_grams(model, adapter, ids, mask, 2, label="wiki", progress=False)
    assert no_hooks(model)


def test_another_model_or_capture_configuration_is_refused(corpora):
    store, corpora_keys = corpora
    llama = gram_of(store, corpora_keys["fox"], "tiny:llama")
    qwen = gram_of(store, corpora_keys["code"], "tiny:qwen2", source="code")
    with pytest.raises(ArtifactError, match=f"gram artifact {llama} was computed on another "
                                            "model"):
        read_gram(store, llama, 0, model=resolve_model("tiny:qwen2").fingerprint)
    with pytest.raises(ArtifactError, match="another model"):
        pooled_gram(store, [llama, qwen], 0, "mlp")
    captured = {}
    with pytest.warns(ShortSourceWarning):
        for name, model, settings in (("same", "tiny:llama", SETTINGS),
                                      ("qwen", "tiny:qwen2", SETTINGS),
                                      ("short", "tiny:llama", {**SETTINGS, "seq_len": 128})):
            config = CaptureConfig(source="fox", device="cpu", **settings)
            captured[name] = store.read(run_capture(config, store, model, corpora_keys["fox"]))
    gram = store.read(llama)
    check_gram_matches(gram, captured["same"])
    with pytest.raises(ArtifactError, match="computed on another model"):
        check_gram_matches(gram, captured["qwen"])
    with pytest.raises(ArtifactError, match=r"has seq_len=160 but capture .* seq_len=128"):
        check_gram_matches(gram, captured["short"])
    with pytest.raises(ConfigError, match="normalize"):
        pooled_gram(store, [llama], 0, "mlp", normalize="mean")


def test_pooled_gram_per_source_and_token_weighted(corpora):
    store, corpora_keys = corpora
    keys = [gram_of(store, corpora_keys[name], "tiny:llama", source=name, storage_dtype="float64")
            for name in ("fox", "code")]
    grams = [read_gram(store, key, 2)["attn"] for key in keys]
    tokens = [store.read(key).extra["tokens"] for key in keys]
    per_source = pooled_gram(store, keys, 2, "attn")
    assert torch.allclose(per_source, (grams[0] / tokens[0] + grams[1] / tokens[1]) / 2)
    assert per_source[-1, -1] == 1.0
    total = pooled_gram(store, keys, 2, "attn", normalize="sum")
    assert torch.equal(total, grams[0] + grams[1]) and total[-1, -1] == sum(tokens)


def test_pooled_gram_is_read_once_and_again_when_its_file_is_replaced(corpora, monkeypatch):
    from tasks import gram as gram_task

    store, corpora_keys = corpora
    keys = [gram_of(store, corpora_keys[name], "tiny:llama", source=name)
            for name in ("fox", "code")]
    reads, real = [], gram_task._pooled
    monkeypatch.setattr(gram_task, "_pooled", lambda *a: reads.append(a[1:]) or real(*a))
    first = pooled_gram(store, keys, 1, "mlp")
    assert pooled_gram(store, keys, 1, "mlp") is first and len(reads) == 1
    assert pooled_gram(store, keys, 1, "attn") is not first and len(reads) == 2
    path = store.read(keys[0]).file("layer_001.safetensors")
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)               # the same bytes in a new file: read (and checked) again
    again = pooled_gram(store, keys, 1, "mlp")
    assert again is not first and torch.equal(again, first) and len(reads) == 3


def test_config_cost_and_cli_help(capsys):
    from gprune.cli import main

    capture = CaptureConfig(source="wiki", n_sequences=8, seq_len=64, seed=3, device="cpu")
    config = GramConfig.from_capture(capture)
    assert config.params() == {"source": "wiki", "n_sequences": 8, "seq_len": 64,
                               "batch_size": 4, "seed": 3, "storage_dtype": "float32"}
    for bad in (dict(source=" "), dict(source="w", seq_len=0), dict(source="w", device="gpu"),
                dict(source="w", storage_dtype="float16")):
        with pytest.raises(ConfigError):
            GramConfig.build(**bad)
    model = tiny_model("gemma3")
    dims = gram_dims(model, adapter_for(model.config))
    assert dims == [{"mlp": 96, "attn": 64}] * 3
    assert gram_bytes(dims, 8) == 8 * 3 * (97**2 + 65**2)
    # the d x d products (2 FLOPs a multiply-add) and the sums column (1 FLOP an add)
    assert gram_flops_per_token(dims, leaf=10**6) == 3 * (2 * 96**2 + 96 + 2 * 64**2 + 64)
    assert gram_flops_per_token(dims) == 3 * (2 * 96**2 + 96 + 2 * 64**2 + 64)  # < 2 * leaf
    # 97 = 48 | 49 columns, each halved again: diagonal leaves full, off-diagonal blocks once
    assert update_macs(97, leaf=16) == 3 * 24**2 + 48 * 49 + (24**2 + 24 * 25 + 25**2)
    with pytest.raises(SystemExit) as exit_info:
        main(["stage", "gram", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--n-sequences", "--seq-len", "--storage-dtype"))


def test_the_flow_computes_grams_only_when_a_method_needs_them(prefect_api, tmp_path):
    from flows.gprune_flow import gprune_flow
    from artifacts.store import ArtifactStore
    from gprune.methods.base import METHODS
    from gprune.methods.magnitude_sp import MagnitudeSp

    class ToyGram(MagnitudeSp):   # defining it registers it
        name = "toy_gram"
        summary = "test only: magnitude_sp that declares it reads Gram statistics"
        needs = frozenset({"moments", "weights", "gram"})

    base = dict(model="tiny:llama", sources=["wikipedia", "docs"], sparsities=[0.3],
                capture_sequences=2, capture_seq_len=32, capture_batch_size=2,
                evaluate=False, device="cpu")
    store = str(tmp_path / "store")
    try:
        with_gram = gprune_flow(config={**base, "methods": ["toy_gram"]}, store=store)
        without = gprune_flow(config={**base, "methods": ["magnitude_sp"]}, store=store)
    finally:
        METHODS.pop("toy_gram", None)
    assert set(with_gram["gram_keys"]) == {"wikipedia", "docs"} and "gram_keys" not in without
    grams = [a for a in ArtifactStore(store).list() if a.stage == "gram"]
    assert sorted(a.key for a in grams) == sorted(with_gram["gram_keys"].values())
    assert {a.params["seq_len"] for a in grams} == {32}
