"""Stage 6: surgery equals masking, bias compensation equals mean replacement,
pruned checkpoints reload both ways with the right size, mismatched plans are refused."""
from __future__ import annotations

import copy
import json
import random

import pandas as pd
import pytest
import torch

from gprune.configs.surgery import SurgeryConfig
from gprune.errors import ArtifactError, ConfigError
from gprune.maths.plan import LayerPlan, PruningPlan, achieved_sparsity, prunable_params
from gprune.maths.surgery import apply_plan, bias_fits, head_channels, removed_channels
from gprune.models.adapters import ModelShape, adapter_for
from gprune.models.loader import load_model, resolve_model
from gprune.models.pruned import (MANIFEST_FILE, finalize, load_pruned, param_count,
                                  read_manifest, save_pruned)
from gprune.models.tiny import save_tiny_model, tiny_model
from tasks.base import run_stage, stage_spec
from tasks.surgery import MODEL_DIR, run_surgery

TOL = 1e-4


# ---- helpers ---------------------------------------------------------------------
def random_plan(shape: ModelShape, fingerprint: str, family: str, seed: int = 0,
                last_without_attention: bool = False) -> PruningPlan:
    """Layer 0: no attention at all (the cache's length is read from layer 0); layer 1:
    drops a KV group and heads inside kept groups; layer 2: a one-channel MLP. With
    ``last_without_attention`` the last layer keeps no attention either."""
    rng = random.Random(seed)
    g, kv = shape.group_size, shape.kv_heads

    def heads(n_groups: int, per: int) -> list[int]:
        groups = sorted(rng.sample(range(kv), n_groups))
        return [grp * g + h for grp in groups for h in sorted(rng.sample(range(g), per))]

    def mlp(n: int) -> list[int]:
        return rng.sample(range(shape.intermediate), n)

    layers = [LayerPlan.from_heads(0, mlp(shape.intermediate // 2), [], shape),
              LayerPlan.from_heads(1, mlp(shape.intermediate * 3 // 5),
                                   heads(max(1, kv - 1), max(1, g - 1)), shape),
              LayerPlan.from_heads(2, mlp(1), heads(kv, 1), shape)]
    for i in range(3, shape.num_layers):
        layers.append(LayerPlan.from_heads(i, mlp(shape.intermediate // 2), heads(kv, g), shape))
    if last_without_attention:
        last = layers[-1]
        layers[-1] = LayerPlan.from_heads(last.layer, last.mlp_keep, [], shape)
    return PruningPlan(fingerprint, family, "test", 0.5, shape, tuple(layers))


def random_means(shape: ModelShape, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    means = {}
    for layer in range(shape.num_layers):
        means[(layer, "mlp")] = torch.randn(shape.intermediate, generator=gen, dtype=torch.float64)
        means[(layer, "attn")] = torch.randn(shape.heads * shape.head_dim, generator=gen,
                                             dtype=torch.float64)
    return means


def masked_reference(model, plan: PruningPlan, means: dict | None = None):
    """Dense model whose removed channels (inputs of the output projections) read 0, or
    their mean. Hooks only: the weights are untouched."""
    adapter, shape = adapter_for(model.config), plan.dense
    for lp, layer in zip(plan.layers, adapter.decoder_layers(model)):
        mlp_keep = torch.tensor(lp.mlp_keep, dtype=torch.long)
        attn_keep = head_channels(lp.heads_keep, shape.head_dim)
        for linear, keep, size, kind in (
                (adapter.mlp_output(layer), mlp_keep, shape.intermediate, "mlp"),
                (adapter.attn_output(layer), attn_keep, shape.heads * shape.head_dim, "attn")):
            removed = removed_channels(keep, size)
            fill = means[(lp.layer, kind)].float() if means else torch.zeros(size)
            linear.register_forward_pre_hook(_replace_hook(removed, fill[removed]))
    return model


def _replace_hook(removed: torch.Tensor, values: torch.Tensor):
    def hook(module, args):
        x = args[0].clone()          # (batch, seq, channels)
        x[..., removed] = values.to(x.dtype)
        return (x,) + tuple(args[1:])
    return hook


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def ids_for(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(seed))


def expected_params(dense, plan: PruningPlan, compensated: bool) -> int:
    """Dense count minus removed weights and sliced q/k/v/MLP-input biases (and the
    q/k norms of a layer without heads), plus the output biases compensation creates."""
    adapter, shape = adapter_for(dense.config), plan.dense
    layer0 = adapter.decoder_layers(dense)[0]
    q, k, _ = adapter.attn_qkv(layer0)
    mlp_in_bias = sum(1 for lin in adapter.mlp_inputs(layer0) if lin.bias is not None)
    projections = (adapter.q, adapter.k, adapter.v, adapter.o)
    head_norms = sum(p.numel() for n, p in adapter.attn_module(layer0).named_parameters()
                     if not n.startswith(projections))
    removed = plan.prunable_params - plan.kept_prunable_params
    for lp in plan.layers:
        removed += head_norms if not lp.heads_keep else 0
        removed += (shape.intermediate - len(lp.mlp_keep)) * mlp_in_bias
        if q.bias is not None:
            removed += (shape.heads - len(lp.heads_keep)) * shape.head_dim
        if k.bias is not None:
            removed += 2 * (shape.kv_heads - len(lp.kv_keep)) * shape.head_dim
    added = 0
    if compensated:
        out_biases = [adapter.mlp_output(layer0).bias, adapter.attn_output(layer0).bias]
        added = shape.num_layers * shape.hidden * sum(b is None for b in out_biases)
    return param_count(dense) - removed + added


def pruned_in_memory(family: str, means: dict | None = None,
                     last_without_attention: bool = False):
    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    plan = random_plan(adapter.shape(dense.config), "fp", family, seed=len(family),
                       last_without_attention=last_without_attention)
    pruned = copy.deepcopy(dense)
    finalize(pruned, adapter, apply_plan(pruned, adapter, plan,
                                         bias_fits(means) if means else None))
    return dense, pruned, plan


# ---- plan ------------------------------------------------------------------------
def test_plan_counts_match_architecture_example():
    shape = ModelShape(num_layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3,
                       head_dim=64, gated=True)
    assert prunable_params(shape) == 106168320
    layers = tuple(LayerPlan.dense(shape, i) for i in range(30))
    plan = PruningPlan("fp", "llama", "gprune", 0.3, shape, layers)
    assert achieved_sparsity(plan) == 0.0
    half = LayerPlan.from_heads(0, range(768), [0, 1, 3, 4], shape)   # groups 0, 1
    assert half.kv_keep == (0, 1)
    plan = PruningPlan("fp", "llama", "gprune", 0.3, shape, (half,) + layers[1:])
    removed = 768 * 3 * 576 + 5 * 2 * 576 * 64 + 2 * 576 * 64
    assert plan.prunable_params - plan.kept_prunable_params == removed
    assert plan.achieved_sparsity == pytest.approx(removed / 106168320)


def test_plan_json_round_trip_and_validation(tmp_path):
    shape = adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config)
    plan = random_plan(shape, "abc", "llama")
    plan.write(tmp_path)
    back = PruningPlan.read(tmp_path)
    assert back == plan
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["achieved_sparsity"] == pytest.approx(plan.achieved_sparsity, abs=1e-6)
    assert raw["dense"]["kv_heads"] == 2 and raw["layers"][0]["heads_keep"] == []
    uneven = dict(raw, layers=[dict(raw["layers"][0], heads_keep=[0, 1, 2], kv_keep=[0, 1])]
                  + raw["layers"][1:])
    assert PruningPlan.from_json(json.dumps(dict(raw, layers=[dict(
        raw["layers"][0], heads_keep=[0, 2], kv_keep=[0, 1])] + raw["layers"][1:])))
    with pytest.raises(ConfigError, match="same number of query heads"):
        PruningPlan.from_json(json.dumps(uneven))
    with pytest.raises(ArtifactError, match="malformed"):
        PruningPlan.from_json('{"family": "llama"}')
    with pytest.raises(ConfigError, match="abc.*other"):
        plan.validate_against(shape, "other")


# ---- surgery equals masking ---------------------------------------------------------
def test_pruned_equals_masked_dense(family):
    dense, pruned, plan = pruned_in_memory(family)
    ids = ids_for()
    unmasked = logits(dense, ids)
    reference = logits(masked_reference(dense, plan), ids)
    got = logits(pruned, ids)
    assert got.shape == reference.shape
    assert (got - reference).abs().max().item() < TOL
    assert (unmasked - reference).abs().max().item() > 1e-2   # the plan really removes units
    layers = adapter_for(pruned.config).decoder_layers(pruned)
    assert [s["num_heads"] for s in pruned.config.gprune_layers] == \
        [len(lp.heads_keep) for lp in plan.layers]
    assert adapter_for(pruned.config).mlp_output(layers[2]).weight.shape[1] == 1
    assert param_count(pruned) == expected_params(dense, plan, compensated=False)


@pytest.mark.parametrize("last_without_attention", [False, True], ids=["first", "first+last"])
def test_cache_continuation_matches_full_forward(family, last_without_attention):
    """Prefill then continue from the cache (no position ids): the zero-head layers must
    keep the cache length right, or positions and mask sizes go wrong."""
    _, pruned, plan = pruned_in_memory(family, last_without_attention=last_without_attention)
    assert plan.layers[0].heads_keep == ()
    assert (plan.layers[-1].heads_keep == ()) == last_without_attention
    ids = ids_for(3)
    with torch.no_grad():
        full = pruned(ids).logits
        prefix = pruned(ids[:, :7], use_cache=True)
        cache = prefix.past_key_values
        assert cache.get_seq_length() == 7
        assert [cache.get_seq_length(i) for i in range(len(plan.layers))] == \
            [7] * len(plan.layers)
        step = pruned(ids[:, 7:], past_key_values=cache).logits
    assert (step - full[:, 7:]).abs().max().item() < TOL


@pytest.mark.parametrize("last_without_attention", [False, True], ids=["first", "first+last"])
def test_greedy_generate_matches_masked_dense(family, last_without_attention, tmp_path):
    """16 greedy tokens from the saved checkpoint (remote code, KV cache) equal greedy
    decoding of the dense model with the same units masked, without a cache; so does a
    generation resumed from the cache an earlier generate() returned (its start position
    is read from the cache's length)."""
    from transformers import AutoModelForCausalLM

    dense, pruned, plan = pruned_in_memory(family, last_without_attention=last_without_attention)
    save_pruned(pruned, None, tmp_path / "ckpt", {"test": True})
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt",
                                                  trust_remote_code=True).eval()
    reference = masked_reference(dense, plan)
    prompt = ids_for(4)[:, :5]
    with torch.no_grad():
        got = remote.generate(prompt, use_cache=True, **greedy(16))
        want = reference.generate(prompt, use_cache=False, **greedy(16))
        first = remote.generate(prompt, use_cache=True, return_dict_in_generate=True,
                                **greedy(8))
        cache = {cache_keyword(remote): returned_cache(first)}
        resumed = remote.generate(first.sequences, use_cache=True, **cache, **greedy(8),
                                  attention_mask=torch.ones_like(first.sequences))  # pads too
        unpruned = tiny_model(family).generate(prompt, use_cache=True, **greedy(16))
    assert got.shape == (2, 21)
    assert torch.equal(got, want)
    assert torch.equal(resumed, want)
    assert not torch.equal(got, unpruned)      # the plan changes what the model says


def greedy(tokens: int) -> dict:
    return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=258)


def cache_keyword(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.24."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_bias_compensation_equals_mean_replacement(family):
    dense = tiny_model(family)
    means = random_means(adapter_for(dense.config).shape(dense.config))
    dense, pruned, plan = pruned_in_memory(family, means)
    ids = ids_for(1)
    reference = logits(masked_reference(dense, plan, means), ids)
    zeroed = logits(masked_reference(tiny_model(family), plan), ids)
    got = logits(pruned, ids)
    assert (got - reference).abs().max().item() < TOL
    assert (got - zeroed).abs().max().item() > 1e-2        # compensation changed something
    assert param_count(pruned) == expected_params(dense, plan, compensated=True)


def test_plan_of_other_shape_refused():
    model = tiny_model("llama", intermediate_size=80)
    adapter = adapter_for(model.config)
    plan = random_plan(adapter_for(tiny_model("llama").config).shape(tiny_model("llama").config),
                       "fp", "llama")
    with pytest.raises(ConfigError, match="make a plan for this model"):
        apply_plan(model, adapter, plan)
    _, pruned, plan = pruned_in_memory("llama")
    with pytest.raises(ConfigError, match="already pruned"):
        apply_plan(pruned, adapter, plan)


# ---- the stage: save, reload both ways, generate ----------------------------------
def write_plan_artifact(store, plan: PruningPlan, model_path) -> str:
    def build(pending):
        plan.write(pending.path)
        pending.extra["model_path"] = str(model_path)
    spec = stage_spec(plan.model_fingerprint, {}, {"plan": plan.to_dict()})
    return run_stage(store, "allocate", spec, build)


def write_stats_artifact(store, fingerprint: str, means: dict) -> str:
    rows = [{"layer": layer, "kind": kind, "channel": c, "mean": float(v)}
            for (layer, kind), values in means.items() for c, v in enumerate(values.tolist())]
    frame = pd.DataFrame(rows).astype({"layer": "int32", "channel": "int32"})

    def build(pending):
        frame.to_parquet(pending.file("channels.parquet"))
    return run_stage(store, "stats", stage_spec(fingerprint, {}, {"test": True}), build)


def test_surgery_stage_saves_checkpoint_that_reloads_both_ways(family, store, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = resolve_model(str(save_tiny_model(family, tmp_path / "dense")))
    dense, _, adapter = load_model(ref)
    shape = adapter.shape(dense.config)
    plan = random_plan(shape, ref.fingerprint, family, seed=len(family))
    means = random_means(shape)
    plan_key = write_plan_artifact(store, plan, ref.path)
    stats_key = write_stats_artifact(store, ref.fingerprint, means)
    config = SurgeryConfig(reconstruct="bias", device="cpu")

    key = run_surgery(config, store, plan_key, stats_key)
    assert run_surgery(config, store, plan_key, stats_key) == key      # reused
    artifact = store.read(key, stage="surgery")
    folder = artifact.file(MODEL_DIR)
    assert {"config.json", "model.safetensors", "modeling_gprune.py", MANIFEST_FILE,
            "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    source = (folder / "modeling_gprune.py").read_text()
    assert "import gprune" not in source and "from gprune" not in source
    manifest = read_manifest(folder)
    assert manifest["plan_key"] == plan_key and manifest["method"] == "test"
    assert manifest["achieved_sparsity"] == pytest.approx(plan.achieved_sparsity)
    assert artifact.extra["pruned_params"] == expected_params(dense, plan, compensated=True)

    ids = ids_for(2)
    reference = logits(masked_reference(dense, plan, means), ids)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    project, tokenizer, _ = load_model(str(folder))
    in_process, _, _ = load_pruned(folder)
    for model in (remote, project, in_process):
        assert (logits(model, ids) - reference).abs().max().item() < TOL
        assert param_count(model) == artifact.extra["pruned_params"]
    assert json.loads((folder / "config.json").read_text())["model_type"] == \
        dense.config.model_type

    prompt = ids[:1, :6]
    cached = remote.generate(prompt, max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    uncached = project.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False,
                                pad_token_id=tokenizer.pad_token_id)
    assert cached.shape == (1, 12) and torch.equal(cached, uncached)


def test_plan_from_another_model_refused(store, tmp_path):
    ref = resolve_model(str(save_tiny_model("llama", tmp_path / "a", seed=0)))
    other = resolve_model(str(save_tiny_model("llama", tmp_path / "b", seed=1)))
    assert ref.fingerprint != other.fingerprint
    dense, _, adapter = load_model(ref)
    plan = random_plan(adapter.shape(dense.config), ref.fingerprint, "llama")
    plan_key = write_plan_artifact(store, plan, ref.path)
    with pytest.raises(ConfigError, match=f"{ref.fingerprint}.*{other.fingerprint}"):
        run_surgery(SurgeryConfig(device="cpu"), store, plan_key, model=str(other.path))
    with pytest.raises(ConfigError, match="stats"):
        run_surgery(SurgeryConfig(reconstruct="bias", device="cpu"), store, plan_key)
    assert not list((store.root).glob("surgery/*"))


def test_speed_benchmark_runs_on_tiny_model(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    speed.main(["--model", "tiny:llama", "--prompt-tokens", "16", "--decode-tokens", "2",
                "--repeats", "1", "--device", "cpu", "--heads-per-group", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and "heads_per_kv_group=1" in lines[-2]
    name, value = lines[-1].split("=")
    assert name == "prefill_speedup_over_theoretical" and float(value) > 0
    dense_flops = float(lines[1].split("prefill_flops_per_token=")[1].split()[0])
    pruned_flops = float(lines[3].split("prefill_flops_per_token=")[1].split()[0])
    assert pruned_flops < dense_flops
