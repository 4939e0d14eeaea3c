"""Unpruned vs pruned (NSA, arXiv 2503.01542, step 3): which influential words lost the
units that matched them, and how the surviving units' activations on them shifted.

Inputs are tables, no model: ``matches`` (the neurons stage: per unit its best distinct
words, rank 0 = its label), ``words`` (per task the ranked influential words) and the
plan's kept units (``kept_units``). The units that match a word most are the
``units_per_word`` units, among those with the word in their top words, of the highest
selectivity (activation on the word / the unit's mean activation over all words: a unit
that fires on the word and little else, not one that fires on everything); each weighs
its selectivity. A word's ``lost`` share is the weight of its matched units that the plan
removes over the weight of all of them; per layer and in total. A word is *damaged*
when lost >= ``threshold``; a task's damaged share is over its ``top_n`` influential
words (those no unit matched count as not damaged, and are counted).
"""
from __future__ import annotations

import pandas as pd
import torch

KEYS = ["layer", "kind", "unit"]


def kept_units(plan_layers: list[dict]) -> pd.DataFrame:
    """(layer, kind, unit) of every unit the plan keeps (``plan.json``'s ``layers``)."""
    rows = [(entry["layer"], kind, unit) for entry in plan_layers
            for kind, field in (("mlp", "mlp_keep"), ("attn", "heads_keep"))
            for unit in entry[field]]
    return pd.DataFrame(rows, columns=KEYS)


def weighted_matches(matches: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """``matches`` with ``weight`` (the selectivity) and ``kept`` (bool)."""
    out = matches.assign(weight=matches["selectivity"].astype("float64")).merge(
        kept.assign(kept=True), on=KEYS, how="left")
    return out.assign(kept=out["kept"].astype("boolean").fillna(False).astype(bool))


def word_damage(matches: pd.DataFrame, kept: pd.DataFrame, words: pd.DataFrame,
                top_n: int, units_per_word: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per word: task, word, influence, rank, matched, pruned, lost; per word and layer:
    task, word, layer, kind, matched, pruned, lost) over each task's ``top_n`` words."""
    chosen = words[words["rank"] < top_n][["task", "word", "influence", "rank"]]
    best = (weighted_matches(matches, kept).sort_values("weight", ascending=False)
            .groupby("word").head(units_per_word))
    hits = best.merge(chosen, on="word")
    hits = hits.assign(pruned_weight=hits["weight"].where(~hits["kept"], 0.0),
                       pruned=(~hits["kept"]).astype(int))
    per_layer = (hits.groupby(["task", "word", "layer", "kind"])
                 .agg(matched=("unit", "size"), pruned=("pruned", "sum"),
                      weight=("weight", "sum"), pruned_weight=("pruned_weight", "sum"))
                 .reset_index())
    per_layer["lost"] = per_layer["pruned_weight"] / per_layer["weight"]
    total = (hits.groupby(["task", "word"])
             .agg(matched=("unit", "size"), pruned=("pruned", "sum"),
                  weight=("weight", "sum"), pruned_weight=("pruned_weight", "sum"))
             .reset_index())
    total = chosen.merge(total, on=["task", "word"], how="left")
    total[["matched", "pruned"]] = total[["matched", "pruned"]].fillna(0).astype(int)
    total["lost"] = total["pruned_weight"] / total["weight"]          # NaN: never matched
    total = total.drop(columns=["weight", "pruned_weight"])
    return (total.sort_values(["task", "rank"]).reset_index(drop=True),
            per_layer.drop(columns=["weight", "pruned_weight"]))


def removed_share(matches: pd.DataFrame, kept: pd.DataFrame) -> float:
    """The share of all matched units (every MLP channel and query head) the plan removes:
    what a word's ``lost`` would be if the plan ignored what units respond to."""
    units = matches[KEYS].drop_duplicates()
    return 1.0 - len(units.merge(kept, on=KEYS)) / max(len(units), 1)


def damage_summary(damage: pd.DataFrame, threshold: float, removed: float) -> pd.DataFrame:
    """Per task: influential words considered and matched, damaged (lost >= threshold),
    their share, the mean and the influence-weighted lost share against ``removed`` (the
    plan's share of all units), and the most damaged words (by lost x influence)."""
    rows = []
    for task, group in damage.groupby("task"):
        matched = group[group["matched"] > 0]
        damaged = matched[matched["lost"] >= threshold]
        weight = float(matched["influence"].sum())
        worst = matched.assign(score=matched["lost"] * matched["influence"])
        worst = worst[worst["lost"] > 0].sort_values("score", ascending=False)
        rows.append({"task": task, "words": len(group), "matched": len(matched),
                     "damaged": len(damaged), "damaged_share": len(damaged) / len(group),
                     "units_removed": removed, "mean_lost": float(matched["lost"].mean()),
                     "influence_lost": float((matched["lost"] * matched["influence"]).sum()
                                             / weight) if weight > 0 else 0.0,
                     "most_damaged": ", ".join(worst["word"].head(8))})
    return pd.DataFrame(rows)


def activation_shift(dense: dict[tuple[int, str], torch.Tensor],
                     pruned: dict[tuple[int, str], torch.Tensor],
                     plan_layers: list[dict]) -> pd.DataFrame:
    """Per layer and kind: the surviving units' mean activation on the influential words,
    dense vs pruned (pruned unit j is dense unit keep[j]), and the median relative shift.
    ``dense``/``pruned``: (layer, kind) -> per-unit means (units,)."""
    rows = []
    for entry in plan_layers:
        for kind, field in (("mlp", "mlp_keep"), ("attn", "heads_keep")):
            keep = torch.tensor(entry[field], dtype=torch.long)
            key = (entry["layer"], kind)
            if keep.numel() == 0 or key not in dense or key not in pruned:
                continue
            before, after = dense[key][keep], pruned[key]                  # (kept,), (kept,)
            rel = (after - before) / before.clamp(min=1e-12)
            rows.append({"layer": entry["layer"], "kind": kind, "kept": int(keep.numel()),
                         "dense_mean": float(before.mean()), "pruned_mean": float(after.mean()),
                         "median_shift": float(rel.median())})
    return pd.DataFrame(rows, columns=["layer", "kind", "kept", "dense_mean", "pruned_mean",
                                       "median_shift"])


def label_counts(matches: pd.DataFrame, kept: pd.DataFrame, layer: int, top: int,
                 skip: frozenset[str] = frozenset()) -> tuple[pd.Series, pd.Series]:
    """(kept, pruned) MLP units of ``layer``: how many carry each label (the unit's best
    word not in ``skip``)."""
    rows = matches[(matches["layer"] == layer) & (matches["kind"] == "mlp")
                   & ~matches["word"].isin(skip)]
    labels = weighted_matches(rows.sort_values("rank").groupby(KEYS).head(1), kept)
    return (labels[labels["kept"]]["word"].value_counts().head(top),
            labels[~labels["kept"]]["word"].value_counts().head(top))
