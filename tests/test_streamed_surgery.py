"""Surgery layer streamed: the checkpoint written one layer per shard loads as the in-memory
surgery's checkpoint does, with equal weights and logits, on tiny models of several families
(GQA, sliding windows, biases, a layer left without attention heads), with the lsq refit."""
from __future__ import annotations

import pytest
import torch

from gprune.maths.surgery import apply_plan, lsq_fits
from gprune.models.loader import load_model, load_tokenizer, resolve_model
from gprune.models.pruned import finalize, load_pruned, param_count, save_pruned
from gprune.models.streamed import StreamedModel
from gprune.models.streamed_checkpoint import INDEX_FILE, save_pruned_streamed
from tests.synthetic import synthetic_grams
from tests.test_surgery import random_plan


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "starcoder2"])
def test_streamed_surgery_writes_the_in_memory_checkpoint(family, tmp_path):
    ref = resolve_model(f"tiny:{family}")
    model, tokenizer, adapter = load_model(ref)
    shape = adapter.shape(model.config)
    plan = random_plan(shape, "x", family, seed=2)
    gram_of = synthetic_grams(shape)
    dense_params = param_count(model)
    finalize(model, adapter, apply_plan(model, adapter, plan, lsq_fits(gram_of, 1e-3, [])))
    save_pruned(model, tokenizer, tmp_path / "memory", {"how": "memory"})
    source = StreamedModel(ref.path)
    counts = save_pruned_streamed(source, plan, lsq_fits(gram_of, 1e-3, []), tmp_path / "stream",
                                  load_tokenizer(ref.path), {"how": "stream"}, torch.float32)
    assert counts == {"dense_params": dense_params, "pruned_params": param_count(model)}
    assert (tmp_path / "stream" / INDEX_FILE).is_file()
    assert not list((tmp_path / "stream").glob("*.part"))
    want, _, _ = load_pruned(tmp_path / "memory")
    got, _, _ = load_pruned(tmp_path / "stream")
    assert got.config.gprune_layers == want.config.gprune_layers
    assert got.state_dict().keys() == want.state_dict().keys()
    for name, tensor in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    assert all(p.is_meta for layer in source.layers for p in layer.parameters())


def test_surgery_stage_streamed_equals_in_memory(tmp_path):
    """The stage with stream=on: the same key (stream is not in it) and, forced, a
    checkpoint with the in-memory one's weights; the remote-code class loads it."""
    from transformers import AutoModelForCausalLM

    from artifacts.store import ArtifactStore
    from gprune.configs.surgery import SurgeryConfig
    from tasks.surgery import MODEL_DIR, run_surgery

    ref = resolve_model("tiny:qwen2")
    model, _, adapter = load_model(ref)
    plan = random_plan(adapter.shape(model.config), ref.fingerprint, "qwen2", seed=3)
    store = ArtifactStore(tmp_path / "store")
    plan_key = _plan_artifact(store, plan, ref)
    memory = run_surgery(SurgeryConfig(reconstruct="none", stream="off"), store, plan_key)
    want = {k: v.clone() for k, v in load_pruned(store.read(memory).file(MODEL_DIR))[0]
            .state_dict().items()}
    counts = {k: store.read(memory).extra[k] for k in ("dense_params", "pruned_params")}
    streamed = run_surgery(SurgeryConfig(reconstruct="none", stream="on"), store, plan_key,
                           force=True)
    assert streamed == memory
    folder = store.read(streamed).file(MODEL_DIR)
    assert (folder / INDEX_FILE).is_file()
    got = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).state_dict()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert {k: store.read(streamed).extra[k] for k in counts} == counts


def _plan_artifact(store, plan, ref) -> str:
    """An allocate artifact holding ``plan`` for ``ref`` (as the allocate stage writes one)."""
    from tasks.base import run_stage, stage_spec

    def build(out):
        plan.write(out.path)
        out.extra["model_path"] = str(ref.path)

    return run_stage(store, "allocate", stage_spec(ref.fingerprint, {}, {"test": "streamed"}),
                     build, False)
