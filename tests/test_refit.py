"""Least-squares reconstruction (gprune.maths.refit) against brute force, and a pruned
checkpoint with refit weights that reloads and equals its masked-and-refit reference."""
from __future__ import annotations

import copy

import pytest
import torch

from gprune.maths.refit import bias_refit, lsq_refit, normalized, residual_error
from gprune.maths.surgery import apply_plan, head_channels, lsq_fits
from gprune.models.adapters import adapter_for
from gprune.models.pruned import finalize
from gprune.models.tiny import tiny_model
from tests.test_surgery import ids_for, logits, random_plan

GEN = torch.Generator().manual_seed(0)


def sample(n: int = 400, d: int = 12, out: int = 5):
    x = torch.randn(n, d, generator=GEN, dtype=torch.float64) @ torch.randn(
        d, d, generator=GEN, dtype=torch.float64) + 0.3                    # (n, d) correlated
    w = torch.randn(out, d, generator=GEN, dtype=torch.float64)          # (out, d)
    b = torch.randn(out, generator=GEN, dtype=torch.float64)             # (out,)
    return x, w, b


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """Brute force: sums of [x, 1][x, 1]^T, corner = token count."""
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)     # (n, d+1)
    return xt.T @ xt                                                     # (d+1, d+1)


def test_refit_equals_ridge_least_squares_solved_directly():
    x, w, b = sample()
    keep = torch.tensor([0, 2, 3, 7, 9, 11])
    ridge = 1e-2
    got = lsq_refit(w, b, normalized(gram_of(x)), keep, ridge)
    # brute force: min_B mean||y - [x_K, 1] B^T||^2 + lam ||B_K||^2 via an augmented lstsq
    y = x @ w.T + b                                                      # (n, out)
    z = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (n, k+1)
    lam = ridge * (x[:, keep] ** 2).mean(0).mean()
    penalty = torch.diag(torch.cat([torch.full((len(keep),), lam.sqrt()),
                                    torch.zeros(1, dtype=x.dtype)]))
    n = len(x)
    a = torch.cat([z / n ** 0.5, penalty])                               # (n+k+1, k+1)
    target = torch.cat([y / n ** 0.5, torch.zeros(len(keep) + 1, w.shape[0], dtype=x.dtype)])
    want = torch.linalg.lstsq(a, target).solution.T                      # (out, k+1)
    assert torch.allclose(got.weight, want[:, :-1], rtol=1e-7, atol=1e-8)
    assert torch.allclose(got.bias, want[:, -1], rtol=1e-7, atol=1e-8)
    error = ((y - (x[:, keep] @ got.weight.T + got.bias)) ** 2).sum(1).mean()
    assert got.residual == pytest.approx(float(error), rel=1e-9)
    assert got.condition > 1


def test_refit_from_dense_products_equals_the_plain_refit_and_brute_force():
    from gprune.maths.refit import dense_map, dense_products

    x, w, b = sample()
    gram, keep = normalized(gram_of(x)), torch.tensor([1, 4, 5, 8])
    plain = lsq_refit(w, b, gram, keep, 1e-3)
    given = lsq_refit(w, b, gram, keep, 1e-3, products=dense_products(dense_map(w, b), gram))
    assert torch.allclose(plain.weight, given.weight, rtol=1e-9, atol=1e-12)
    assert torch.allclose(plain.bias, given.bias, rtol=1e-9, atol=1e-12)
    assert torch.allclose(plain.per_output, given.per_output, rtol=1e-7, atol=1e-12)
    y = x @ w.T + b                                                      # (n, out) brute force
    for got in (plain, given):
        fitted = x[:, keep] @ got.weight.T + got.bias
        assert got.residual == pytest.approx(float(((y - fitted) ** 2).sum(1).mean()), rel=1e-6)


def test_memoized_fits_solve_each_refit_once_and_hand_out_copies():
    memo_values, computed = {}, []

    def memo(layer, kind, key, compute):
        if (layer, kind, key) not in memo_values:
            computed.append(key[0])
            memo_values[(layer, kind, key)] = compute()
        return memo_values[(layer, kind, key)]

    x, w, b = sample()
    gram = normalized(gram_of(x))
    keep = torch.tensor([0, 3, 5, 6])
    plain_report, memo_report = [], []
    want = lsq_fits(lambda layer, kind: gram, 1e-3, plain_report)(2, "mlp")(w, b, keep)
    fit = lsq_fits(lambda layer, kind: gram, 1e-3, memo_report, memo=memo)(2, "mlp")
    first, second = fit(w, b, keep), fit(w, b, keep)
    assert computed == ["refit", "products"]               # the second call solved nothing
    for got in (first, second):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert first[0] is not second[0]                       # the memo's tensors stay its own
    assert memo_report == plain_report * 2
    fit(w, b, torch.tensor([0, 3, 5]))                     # another kept set: same products
    assert computed == ["refit", "products", "refit"]


def test_keeping_every_channel_reproduces_the_dense_map():
    x, w, b = sample()
    got = lsq_refit(w, b, normalized(gram_of(x)), torch.arange(12), ridge=1e-12)
    assert torch.allclose(got.weight, w, atol=1e-6) and torch.allclose(got.bias, b, atol=1e-6)
    assert got.residual < 1e-8


def test_refit_beats_bias_compensation_beats_nothing_on_the_calibration_data():
    x, w, b = sample()
    keep = torch.tensor([1, 4, 5, 8])
    g = normalized(gram_of(x))
    dense = torch.cat([w, b[:, None]], 1)
    s = torch.cat([keep, torch.tensor([12])])
    errors = {"none": residual_error(dense, g, dense[:, s], s),
              "bias": residual_error(dense, g, torch.cat(
                  [bias_refit(w, b, x.mean(0), keep)[0],
                   bias_refit(w, b, x.mean(0), keep)[1][:, None]], 1), s),
              "lsq": lsq_refit(w, b, g, keep, 1e-6).residual}
    assert errors["lsq"] < errors["bias"] < errors["none"]


def test_non_finite_gram_is_refused():
    x, _, _ = sample()
    g = gram_of(x)
    g[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        normalized(g)


def projection_grams(model, ids) -> dict:
    """(layer, kind) -> normalized Gram of the output projections' inputs (brute force)."""
    adapter, inputs, handles = adapter_for(model.config), {}, []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for kind, linear in (("mlp", adapter.mlp_output(layer)),
                             ("attn", adapter.attn_output(layer))):
            def hook(_m, args, key=(i, kind)):
                inputs[key] = args[0].reshape(-1, args[0].shape[-1]).double()
            handles.append(linear.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return {key: normalized(gram_of(x)) for key, x in inputs.items()}


def refit_reference(dense, plan, grams, ridge):
    """The dense model with each output projection's removed columns zeroed and its kept
    columns and bias replaced by the refit (no slicing): what the pruned model must equal."""
    model, adapter, shape = copy.deepcopy(dense), adapter_for(dense.config), plan.dense
    for lp, layer in zip(plan.layers, adapter.decoder_layers(model)):
        for kind, linear, keep in (
                ("mlp", adapter.mlp_output(layer), torch.tensor(lp.mlp_keep)),
                ("attn", adapter.attn_output(layer), head_channels(lp.heads_keep, shape.head_dim))):
            fit = lsq_refit(linear.weight, linear.bias, grams[(lp.layer, kind)], keep, ridge)
            with torch.no_grad():
                linear.weight.zero_()
                linear.weight[:, keep] = fit.weight.float()
                linear.bias = torch.nn.Parameter(fit.bias.float())
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "starcoder2"])
def test_lsq_surgery_equals_its_refit_reference(family):
    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    plan = random_plan(adapter.shape(dense.config), "fp", family, seed=3)
    grams = projection_grams(dense, ids_for(5))
    pruned, report = copy.deepcopy(dense), []
    fits = lsq_fits(lambda layer, kind: grams[(layer, kind)], 1e-2, report)
    finalize(pruned, adapter, apply_plan(pruned, adapter, plan, fits))
    ids = ids_for(1)
    reference = logits(refit_reference(dense, plan, grams, 1e-2), ids)
    assert (logits(pruned, ids) - reference).abs().max().item() < 1e-4
    assert len(report) == 2 * plan.dense.num_layers
    assert all(r["condition"] >= 1 and r["residual"] >= 0 for r in report)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_refit_error_allocation_meets_budget_and_beats_uniform_mlp_only(family):
    from gprune.maths.allocate import project
    from gprune.maths.partition import partition_units
    from gprune.maths.fisher import output_fisher
    from gprune.maths.refit_allocate import error_after_refit, ladder_fractions, mlp_kept
    from gprune.maths.refit_allocate import refit_ladders
    from gprune.maths.score import score_units
    from tests.synthetic import random_units

    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    shape = adapter.shape(dense.config)
    grams = projection_grams(dense, torch.randint(0, 256, (4, 24), generator=GEN))
    layers = adapter.decoder_layers(dense)
    maps = lambda l, kind: ((adapter.mlp_output if kind == "mlp" else adapter.attn_output)(  # noqa: E731
        layers[l]).weight, (adapter.mlp_output if kind == "mlp" else adapter.attn_output)(
        layers[l]).bias)
    units = random_units(shape, sources=2, seed=4)
    scores, _ = score_units(units, partition_units(units, 1, "wanda_sp"), "wanda_sp",
                            "wanda_sp", gate=False)
    sparsity = 0.3
    ids = torch.randint(0, 256, (4, 24), generator=GEN)
    fisher = output_fisher(dense, adapter, [(ids, torch.ones_like(ids))])
    weights = lambda l, k: fisher[l][k]                                           # noqa: E731
    table = refit_ladders(scores, shape, True, lambda l, k: grams[(l, k)], maps, weights, 1e-2)
    fractions, chosen = ladder_fractions(table, scores, shape, sparsity)
    alloc = project(fractions, shape, sparsity, 0.1, True)
    assert abs(1 - alloc.kept_params(shape) / plan_params(shape) - sparsity) < 0.01
    ours = sum(e for _l, _k, _f, e in chosen)
    mlp_share = shape.num_layers * shape.intermediate * shape.params_per_channel
    uniform = 1 - sparsity * plan_params(shape) / mlp_share     # MLP-only, every head kept
    baseline = sum(error_after_refit(*maps(l, "mlp"), grams[(l, "mlp")],
                                     mlp_kept(scores, l, uniform, 0.1), 1e-2,
                                     weights(l, "mlp"))
                   for l in range(shape.num_layers))
    assert ours <= baseline * 1.0001


def plan_params(shape) -> int:
    from gprune.maths.plan import prunable_params

    return prunable_params(shape)


def test_lsq_surgery_stage_checkpoint_reloads_and_equals_its_reference(store, tmp_path):
    """gram stage -> surgery(reconstruct=lsq) -> AutoModelForCausalLM(trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    from gprune.configs.corpus import CorpusConfig
    from gprune.configs.gram import GramConfig
    from gprune.configs.surgery import SurgeryConfig
    from gprune.errors import ConfigError
    from gprune.models.loader import load_model, resolve_model
    from gprune.models.tiny import save_tiny_model
    from tasks.corpus import run_corpus
    from tasks.gram import pooled_gram
    from tasks.surgery import MODEL_DIR, run_surgery
    from tests.test_surgery import write_plan_artifact

    ref = resolve_model(str(save_tiny_model("qwen2", tmp_path / "dense")))
    dense, _, adapter = load_model(ref)
    text = tmp_path / "text.txt"
    text.write_text("".join(f"The miller's daughter counted {i} boats on the river.\n\n"
                            for i in range(80)))
    corpus = run_corpus(CorpusConfig(source=str(text)), store)
    gram = run_gram_for(store, ref, corpus, GramConfig(source="text", n_sequences=4, seq_len=32,
                                                       batch_size=2, storage_dtype="float64"))
    plan = random_plan(adapter.shape(dense.config), ref.fingerprint, "qwen2", seed=2)
    plan_key = write_plan_artifact(store, plan, ref.path)
    with pytest.raises(ConfigError, match="gprune stage gram"):
        run_surgery(SurgeryConfig(reconstruct="lsq", device="cpu"), store, plan_key)
    key = run_surgery(SurgeryConfig(reconstruct="lsq", device="cpu"), store, plan_key,
                      gram_keys=[gram])
    artifact = store.read(key, stage="surgery")
    assert artifact.extra["reconstruct"] == "lsq" and len(artifact.extra["refit"]) == 6
    grams = {(l, k): pooled_gram(store, [gram], l, k) for l in range(3) for k in ("mlp", "attn")}
    ids = ids_for(4)
    ridge = SurgeryConfig().ridge                                 # the stage's default
    reference = logits(refit_reference(dense, plan, grams, ridge), ids)
    remote = AutoModelForCausalLM.from_pretrained(artifact.file(MODEL_DIR),
                                                  trust_remote_code=True).eval()
    assert (logits(remote, ids) - reference).abs().max().item() < 1e-4


def run_gram_for(store, ref, corpus: str, config) -> str:
    from tasks.gram import run_gram

    return run_gram(config, store, str(ref.path), corpus)
