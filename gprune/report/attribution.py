"""Render an attribution (NSA, arXiv 2503.01542): PNG figures (matplotlib, no display),
a self-contained HTML page (figures inlined) and a Markdown summary.

``labels.png``: for the most damaged layers, how many kept and pruned MLP units carry
each label (a unit's best word that is not a function word); ``damage.png``: the influential words whose matched
units the plan removed most (lost share, influence in the label).
"""
from __future__ import annotations

import base64
import html
import math
import warnings
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from gprune.maths.attribution import label_counts
from gprune.maths.words import stop_words

FIGURES = {"labels": "labels.png", "damage": "damage.png"}


def shown_layers(per_layer: pd.DataFrame, kept: pd.DataFrame, matches: pd.DataFrame,
                 count: int) -> list[int]:
    """The ``count`` layers whose MLP units matching influential words lost most (ties and
    no damage: the layers with the most pruned MLP units)."""
    layers = sorted(matches["layer"].unique())
    pruned = {layer: -int((kept[(kept.layer == layer) & (kept.kind == "mlp")]).shape[0])
              for layer in layers}
    mlp = per_layer[per_layer["kind"] == "mlp"].groupby("layer")["pruned"].sum()
    order = sorted(layers, key=lambda layer: (-int(mlp.get(layer, 0)), -pruned[layer], layer))
    return sorted(order[:count])


def plot_labels(matches, kept, layers: list[int], top: int, path: Path, dpi: int) -> None:
    cols = min(len(layers), 3)
    rows = max(1, math.ceil(len(layers) / cols))
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes, layers):
        kept_n, pruned_n = label_counts(matches, kept, layer, top, stop_words())
        half = max(top // 2, 1)                    # the kept side's labels show too
        words = list(dict.fromkeys([*pruned_n.index[:half], *kept_n.index[:half],
                                    *pruned_n.index, *kept_n.index]))[:top]
        y = range(len(words))
        ax.barh([i - 0.2 for i in y], [kept_n.get(w, 0) for w in words], 0.4,
                label="kept", color="#4c72b0")
        ax.barh([i + 0.2 for i in y], [pruned_n.get(w, 0) for w in words], 0.4,
                label="pruned", color="#c44e52")
        ax.set_yticks(list(y), words, fontsize=8)
        ax.invert_yaxis()
        ax.set(title=f"layer {layer}: MLP units by label", xlabel="units")
    if layers:
        axes[0].legend(fontsize=8)
    _save(fig, path)


def plot_damage(damage: pd.DataFrame, removed: float, path: Path, dpi: int,
                top: int = 15) -> None:
    rows = damage[damage["matched"] > 0].assign(score=lambda d: d["lost"] * d["influence"])
    rows = rows.sort_values("score", ascending=False).head(top)
    fig = Figure(figsize=(7.6, 0.32 * max(len(rows), 3) + 1.2), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    labels = [f"{r.word} ({r.task}, infl {r.influence:.2f})" for r in rows.itertuples()]
    ax.barh(range(len(rows)), rows["lost"], color="#c44e52")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(removed, color="black", linestyle="--", linewidth=1,
               label=f"plan removes {removed:.0%} of all units")
    ax.legend(fontsize=8, loc="lower right")
    ax.set(xlim=(0, 1), xlabel="share of the word's units removed (selectivity-weighted)",
           title="damaged concepts: influential words and their lost units")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    """Save, quietly: a word in a script the font lacks is drawn as a box, not a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path)


def summary_markdown(summary: pd.DataFrame, title: str) -> str:
    lines = [f"### Attribution: {title}", "",
             "| task | influential words | matched | damaged | damaged share | units removed "
             "| mean lost | influence lost | most damaged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.task} | {r.words} | {r.matched} | {r.damaged} | "
                     f"{r.damaged_share:.2f} | {r.units_removed:.2f} | {r.mean_lost:.2f} | "
                     f"{r.influence_lost:.2f} | {r.most_damaged} |")
    return "\n".join(lines) + "\n"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _labels_of(matches: pd.DataFrame) -> pd.Series:
    """(layer, kind, unit) -> its top words, joined."""
    ordered = matches.sort_values("rank")
    return ordered.groupby(["layer", "kind", "unit"])["word"].agg(lambda w: ", ".join(w[:5]))


def render_html(frames: dict[str, pd.DataFrame], matches: pd.DataFrame, kept: pd.DataFrame,
                title: str, folder: Path) -> str:
    damage, per_layer, shift = frames["damage"], frames["damage_layers"], frames["shift"]
    labels = _labels_of(matches)
    worst = per_layer[per_layer["pruned"] > 0].sort_values(["pruned", "lost"],
                                                           ascending=False).head(40)
    lost_units = matches.merge(kept.assign(kept=True), on=["layer", "kind", "unit"], how="left")
    lost_units = lost_units[lost_units["kept"].isna() & lost_units["word"].isin(
        damage.sort_values("lost", ascending=False)["word"].head(10))]
    examples = (lost_units.sort_values("activation", ascending=False)
                .groupby("word").head(3)[["word", "layer", "kind", "unit", "activation"]])
    examples = examples.assign(label=[labels.get((r.layer, r.kind, r.unit), "")
                                      for r in examples.itertuples()])
    parts = [f"<h1>What the plan removed: {html.escape(title)}</h1>",
             "<p>NSA (arXiv 2503.01542): influential words (leave-one-word-out on the gold "
             "answer's log-probability), units matched to the words that activate them "
             "most, and which of those units the plan removes.</p>",
             "<h2>Summary per task</h2>", frames["summary"].to_html(index=False),
             "<h2>Damaged concepts</h2>", _img(folder / FIGURES["damage"], "damage"),
             "<h2>Kept vs pruned units' labels</h2>", _img(folder / FIGURES["labels"], "labels"),
             "<h2>Influential words</h2>", damage.to_html(index=False, float_format="%.3f"),
             "<h2>Removed units of the most damaged words (with their labels)</h2>",
             examples.to_html(index=False, float_format="%.3f"),
             "<h2>Per layer (most pruned matches)</h2>",
             worst.to_html(index=False, float_format="%.3f"),
             "<h2>Activation shift of the surviving units on the influential words</h2>",
             (shift.to_html(index=False, float_format="%.4f") if len(shift)
              else "<p>No checkpoint given: not measured.</p>")]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
             "collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def render_attribution(frames: dict[str, pd.DataFrame], matches: pd.DataFrame,
                       kept: pd.DataFrame, title: str, folder: Path, config) -> None:
    """Write the figures, ``attribution.html`` and ``summary.md`` into ``folder``."""
    folder = Path(folder)
    layers = shown_layers(frames["damage_layers"], kept, matches, config.layers_shown)
    plot_labels(matches, kept, layers, config.labels_shown, folder / FIGURES["labels"],
                config.dpi)
    removed = float(frames["summary"]["units_removed"].iloc[0]) if len(frames["summary"]) else 0.0
    plot_damage(frames["damage"], removed, folder / FIGURES["damage"], config.dpi)
    (folder / "attribution.html").write_text(
        render_html(frames, matches, kept, title, folder), encoding="utf-8")
    (folder / "summary.md").write_text(summary_markdown(frames["summary"], title),
                                       encoding="utf-8")
