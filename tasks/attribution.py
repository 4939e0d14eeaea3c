"""Stage ``attribution`` (NSA, arXiv 2503.01542, step 3): (neurons artifact, plan[,
checkpoint]) -> what the plan removed, in words.

Reads the plan-independent ``neurons`` artifact (each unit's top words, each task's
influential words) and a plan of the same model; ``gprune.maths.attribution`` finds the
influential words whose matched units the plan removes, per layer and in total. With the
plan's checkpoint (a surgery key) it also runs the dense and the pruned model on the
tasks' inputs and compares the surviving units' mean activations on the influential
words (the activation shift). Files:

``damage.parquet``        task, word, influence, rank, matched, pruned, lost
``damage_layers.parquet`` task, word, layer, kind, matched, pruned, lost
``summary.parquet``       per task: words, matched, damaged, damaged_share,
                          units_removed (the plan's share of all units), mean_lost,
                          influence_lost, most_damaged
``shift.parquet``         layer, kind, kept, dense_mean, pruned_mean, median_shift
                          (empty without a checkpoint)
``attribution.html``      the self-contained page (figures inlined)
``labels.png``            per shown layer: kept vs pruned MLP units' labels
``damage.png``            the most damaged influential words
``summary.md``            the summary as Markdown (the report and Prefect show it)
"""
from __future__ import annotations

import logging
import time

import pandas as pd

from artifacts.store import ArtifactStore
from gprune.configs.attribution import AttributionConfig
from gprune.errors import ConfigError
from gprune.maths.attribution import (activation_shift, damage_summary, kept_units,
                                      removed_share, word_damage)
from gprune.maths.neurons import MeanAbs, run_units
from gprune.maths.words import encode_texts
from gprune.models.loader import load_model, resolve_device
from gprune.report.attribution import render_attribution
from tasks.base import run_stage, stage_spec
from tasks.neurons import read_neurons, unit_blocks
from tasks.surgery import read_plan

log = logging.getLogger("gprune")
STAGE = "attribution"
TABLES = ("damage", "damage_layers", "summary", "shift")
WHOLE = 10**9   # encode_texts limits that never cut a task input


def run_attribution(config: AttributionConfig, store: ArtifactStore, neurons_key: str,
                    plan_key: str, checkpoint_key: str | None = None,
                    force: bool = False) -> str:
    """Attribute what the plan removed to the influential words; return the key."""
    tables, manifest = read_neurons(store, neurons_key)
    plan, ref = read_plan(store, plan_key)
    if plan.model_fingerprint != manifest["model"]:
        raise ConfigError(f"attribution: plan {plan_key} is for model {plan.model_fingerprint} "
                          f"but neurons {neurons_key} describe model {manifest['model']}; "
                          "give a plan and a neurons artifact of the same model")
    if checkpoint_key is not None:
        checkpoint = store.read(checkpoint_key, stage="surgery")
        if checkpoint.manifest["inputs"].get("plan") != plan_key:
            raise ConfigError(f"attribution: checkpoint {checkpoint_key} was not cut from plan "
                              f"{plan_key}; give that plan's surgery key")
    layers = plan.to_dict()["layers"]
    spec = stage_spec(plan.model_fingerprint, {"neurons": neurons_key, "plan": plan_key,
                                               "checkpoint": checkpoint_key}, config.params())

    def build(out) -> None:
        started = time.time()
        kept = kept_units(layers)
        damage, per_layer = word_damage(tables["matches"], kept, tables["words"],
                                        config.top_n, config.units_per_word)
        summary = damage_summary(damage, config.threshold,
                                 removed_share(tables["matches"], kept))
        shift = activation_shift({}, {}, [])
        if checkpoint_key is not None:
            shift = _shift(store, ref, checkpoint_key, tables, layers, config)
        frames = {"damage": damage, "damage_layers": per_layer, "summary": summary,
                  "shift": shift}
        for name in TABLES:
            frames[name].to_parquet(out.file(f"{name}.parquet"), index=False)
        title = f"{plan.method} at {plan.target_sparsity:g} on {ref.path.name}"
        render_attribution(frames, tables["matches"], kept, title, out.path, config)
        seconds = time.time() - started
        out.extra.update({"method": plan.method, "target_sparsity": plan.target_sparsity,
                          "achieved_sparsity": plan.achieved_sparsity, "seconds":
                          round(seconds, 2), "model_path": str(ref.path),
                          "summary": summary.to_dict(orient="records")})
        log.info("attribution: %s in %.1fs", title, seconds)

    return run_stage(store, STAGE, spec, build, force)


def _shift(store: ArtifactStore, ref, checkpoint_key: str, tables: dict[str, pd.DataFrame],
           layers: list[dict], config: AttributionConfig) -> pd.DataFrame:
    """The surviving units' mean activations on the influential words' tokens of the
    tasks' inputs, dense vs the plan's checkpoint."""
    from tasks.surgery import MODEL_DIR

    words = tables["words"]
    chosen = set(words[words["rank"] < config.top_n]["word"])
    device = resolve_device(config.device)
    means = []
    for model_path in (ref, store.path(checkpoint_key) / MODEL_DIR):
        model, tokenizer, adapter = load_model(model_path, device)
        encoded = encode_texts(list(tables["inputs"]["query"]), tokenizer, WHOLE, WHOLE,
                               keep=chosen)
        acc = run_units(model, unit_blocks(model, adapter), encoded, config.batch_size, MeanAbs)
        means.append({key: a.mean() for key, a in acc.items() if a.count})
        del model
    return activation_shift(means[0], means[1], layers)
