"""Methods as plugins: golden plans of every built-in method, the registry, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gprune.errors import ConfigError
from gprune.maths.plan import PruningPlan
from gprune.methods.allocators import ALLOCATORS
from gprune.methods.base import METHODS
from gprune.methods.importance import activation_criteria
from gprune.methods.registry import build_method, method_names, parse_spec
from tests.test_stage_chain import chain, plan_for  # noqa: F401  (chain: a module fixture)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "method_plans.json").read_text())


@pytest.mark.parametrize("spec", sorted(GOLDEN["methods"]))
def test_plans_equal_the_plans_recorded_before_the_plugin_change(chain, spec):  # noqa: F811
    """The same units kept, layer by layer, as the pre-plugin code kept (two targets)."""
    store, _, stats = chain
    for sparsity, want in GOLDEN["methods"][spec].items():
        key = plan_for(store, stats, build_method(spec), float(sparsity))
        plan = PruningPlan.read(store.read(key, stage="allocate").path)
        got = [{"mlp_keep": list(l.mlp_keep), "heads_keep": list(l.heads_keep),
                "kv_keep": list(l.kv_keep)} for l in plan.layers]
        assert got == want["layers"], (spec, sparsity)
        assert (plan.reconstruct == "bias") == want["bias_compensation"]


def test_registry_lists_every_builtin_method_criterion_and_allocator():
    assert {"gprune", "flap", "wanda_sp", "magnitude_sp"} <= set(method_names())
    assert method_names()[0] == "gprune"
    assert set(activation_criteria()) == {"wanda_sp", "flap"}
    assert set(ALLOCATORS) >= {"uniform", "flap", "learned", "learned_path"}


@pytest.mark.parametrize("spec, message", [
    ("gprune:k=0", "method gprune: parameter k:"),
    ("gprune:kk=1", "method gprune: parameter kk:"),
    ("gprune:allocator=nope", "unknown allocator 'nope'"),
    ("gprune:metric=nope", "unknown importance criterion 'nope'"),
    ("flap:k=2", "method flap: parameter k:"),
    ("obs", "unknown method 'obs'; known methods: gprune"),
    ("gprune:k", "expected name:key=value"),
])
def test_invalid_methods_fail_at_construction_in_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_method(spec)
    assert "\n" not in str(err.value)


def test_specs_round_trip_through_labels():
    method = build_method("gprune:k=4,gate=true,q_m=0.3")
    assert method.label == "gprune:k=4,gate=true,q_m=0.3"
    assert build_method(method.label).spec() == method.spec() == {
        "name": "gprune", "k": 4, "gate": True, "q_m": 0.3}
    assert parse_spec({"name": "flap", "reconstruct": "none"}) == {
        "name": "flap", "reconstruct": "none"}
    assert build_method("gprune:k=1").label == "gprune"  # defaults are not part of a label


def test_ablations_share_the_score_and_only_path_methods_serve_all_targets():
    gprune, uniform = build_method("gprune"), build_method("gprune:allocator=uniform")
    assert gprune.score_config() == uniform.score_config()
    assert gprune.serves_all_targets and not uniform.serves_all_targets
    assert build_method("magnitude_sp").needs == frozenset({"weights"})


def test_a_method_needing_unknown_statistics_is_refused():
    from gprune.methods.base import Method

    class NeedsGradients(Method):
        name = "needs_gradients_test"
        needs = frozenset({"gradients"})

    try:
        with pytest.raises(ConfigError, match="needs statistics .* gradients"):
            build_method("needs_gradients_test")
    finally:
        METHODS.pop("needs_gradients_test")


def test_help_lists_exactly_the_registry_and_the_stages(capsys):
    import re

    from gprune.cli import main
    from gprune.configs.pipeline import STAGES

    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    listed = re.findall(r"^    ([a-z_]+)", capsys.readouterr().out, re.M)
    assert listed == list(STAGES)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = re.search(r"; methods: (.*?) --", text).group(1)
    assert re.findall(r"(?:^|, )([a-z_]+) \(", named) == list(method_names())
    for option in ("--sparsities", "--eval-tokens", "--no-prune-attention", "--allocator-steps"):
        assert option in text


def test_heads_false_keeps_every_head_whatever_the_run_says():
    from gprune.configs.pipeline import PipelineConfig

    config = PipelineConfig(methods=["gprune", "gprune:heads=true", "wanda_sp"])
    keep_heads, may_prune, baseline = config.method_objects()
    assert config.allocate_config(keep_heads, 0.3).prune_attention is False   # gprune's default
    assert config.allocate_config(may_prune, 0.3).prune_attention is True
    assert config.allocate_config(baseline, 0.3).prune_attention is True
    assert may_prune.label == "gprune:heads=true"
    mlp_only = PipelineConfig(methods=["gprune"], prune_attention=False)
    assert mlp_only.allocate_config(mlp_only.method_objects()[0], 0.3).prune_attention is False
