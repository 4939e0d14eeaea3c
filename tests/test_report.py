"""Report stage: renders from small hand-built perplexity/choice/speed artifacts, one run per
model whichever of its artifacts exist; tags; Prefect publishing."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from artifacts.store import artifact_key
from gprune.configs.report import ReportConfig
from gprune.errors import ConfigError
from gprune.eval.results import record, results_frame
from gprune.report import publish
from gprune.report.table import in_ood_series, long_table
from tasks.report import run_report

SOURCES = ("wikipedia", "code")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stage_rows(ppl: dict[str, float], acc: float, params: float) -> dict[str, list[dict]]:
    """Result rows per evaluation stage, as each stage writes them."""
    return {"perplexity": [*(record("ppl", s, "ppl", v, 0.1 * v, 4000) for s, v in ppl.items()),
                           record("size", "params", "count", params),
                           record("size", "flops_per_token", "flops", 2 * params)],
            "choice": [record("mc", "mmlu_local", "acc", acc, 0.03, 200, skipped=2),
                       record("mc", "siqa_local", "acc_norm", acc + 0.1, 0.03, 200, skipped=6)],
            "speed": [record("speed", "decode_tokens_per_s", "tokens_per_s", 50.0, 1.0, 96)]}


PARAMS = {"perplexity": {"ppl_tokens": 4096, "seq_len": 512, "seed": 0},
          "choice": {"mc_limit": 200, "mc_tasks": ["mmlu_local", "siqa_local"], "seed": 0},
          "speed": {"prefill_tokens": 512, "decode_tokens": 16, "repeats": 3, "seed": 0}}


def fake_eval(store, method, sparsity, calibration, ppl, acc,
              stages=("perplexity", "choice", "speed"), **params) -> list[str]:
    """One artifact per stage in ``stages`` for one model (``params`` added to each
    stage's); their keys."""
    identity = f"surgery-{method}-{sparsity}-{'+'.join(calibration)}"
    rows = stage_rows(ppl, acc, 1e6 * (1 - sparsity))
    keys = []
    for stage in stages:
        spec = {"model": identity, "inputs": {"model": identity},
                "params": {**PARAMS[stage], **params}}
        keys.append(artifact_key(stage, spec))
        with store.write(keys[-1], stage, spec) as pending:
            results_frame(rows[stage]).to_parquet(pending.file("results.parquet"))
            pending.extra.update({"model": "smollm2", "method": method,
                                  "target_sparsity": sparsity,
                                  "calibration_sources": calibration})
            if stage == "perplexity":
                pending.extra["seq_len_used"] = 512
    return keys


@pytest.fixture
def eval_keys(store):
    keys = fake_eval(store, "dense", 0.0, [], {"wikipedia": 20.0, "code": 8.0}, 0.30)
    for method, scale in (("gprune", 1.0), ("wanda_sp", 1.5)):
        for sparsity in (0.2, 0.4):
            ppl = {s: v * (1 + scale * sparsity * (3 if s == "code" else 1))
                   for s, v in {"wikipedia": 20.0, "code": 8.0}.items()}
            keys += fake_eval(store, method, sparsity, ["wikipedia"], ppl, 0.3 - sparsity / 4)
    return keys


def test_report_renders_table_markdown_and_plots(store, eval_keys):
    key = run_report(ReportConfig(title="Demo"), store, eval_keys)
    art = store.read(key, stage="report")
    for name in ("ppl_vs_sparsity.png", "accuracy_vs_sparsity.png", "in_vs_ood.png"):
        data = art.file(name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    table = pd.read_parquet(art.file("results.parquet"))
    assert len(table) == 5 * 7 and table["run"].nunique() == 5  # 3 artifacts per run
    assert table["artifact"].nunique() == 15 and set(table["artifact"]) == set(eval_keys)
    assert len(pd.read_csv(art.file("results.csv"))) == len(table)
    gp = table[(table["method"] == "gprune") & (table["kind"] == "ppl")]
    assert dict(zip(gp["name"], gp["tag"])) == {"wikipedia": "in", "code": "ood"}
    assert set(table.loc[table["kind"] == "mc", "tag"]) == {"ood"}
    summary = pd.read_csv(art.file("summary.csv"))
    assert list(summary["method"]) == ["dense", "gprune", "gprune", "wanda_sp", "wanda_sp"]
    markdown = art.file("report.md").read_text()
    assert markdown.startswith("# Demo\n")
    assert "| method | calibration | sparsity | ppl code | ppl wikipedia |" in markdown
    assert "mmlu_local: 2 malformed row(s) skipped" in markdown
    assert "siqa_local: 6 malformed row(s) skipped" in markdown
    assert "![in_vs_ood.png](in_vs_ood.png)" in markdown
    assert "5 evaluated checkpoint(s)" in markdown
    assert "- mc_limit: 200\n" in markdown and "- decode_tokens: 16\n" in markdown
    assert "- seq_len used: 512\n" in markdown
    assert "decode tok/s" in summary.columns and "FLOPs/token" in summary.columns
    assert run_report(ReportConfig(title="Demo"), store, list(reversed(eval_keys))) == key


def test_in_ood_series_starts_each_line_at_the_dense_model(store, eval_keys):
    from tasks.report import load_runs

    series = in_ood_series(long_table(load_runs(store, eval_keys)))
    line = series[series["label"] == "wanda_sp"].set_index(["sparsity", "tag"])["ppl"]
    assert line[(0.0, "in")] == pytest.approx(20.0)  # dense wikipedia, in for this line
    assert line[(0.0, "ood")] == pytest.approx(8.0)
    assert line[(0.4, "ood")] == pytest.approx(8.0 * (1 + 1.5 * 0.4 * 3))
    assert set(series["label"]) == {"gprune", "wanda_sp"}


def test_methods_with_several_calibration_sets_get_separate_lines(store):
    keys = [key for cal in (["wikipedia"], ["code", "wikipedia"])
            for key in fake_eval(store, "flap", 0.3, cal, {"wikipedia": 30.0}, 0.25)]
    table = long_table(__import__("tasks.report", fromlist=["x"]).load_runs(store, keys))
    assert set(table["label"]) == {"flap [wikipedia]", "flap [code+wikipedia]"}


def test_report_without_mc_tasks_skips_the_accuracy_plot(store):
    """Runs without choice (and here without speed) artifacts: no accuracy plot or columns."""
    only = ("perplexity",)
    keys = [*fake_eval(store, "dense", 0.0, [], {"code": 8.0}, 0.3, stages=only),
            *fake_eval(store, "gprune", 0.5, ["code"], {"code": 12.0}, 0.3, stages=only)]
    art = store.read(run_report(ReportConfig(), store, keys))
    assert not art.file("accuracy_vs_sparsity.png").exists()
    assert art.file("ppl_vs_sparsity.png").stat().st_size > 0
    markdown = art.file("report.md").read_text()
    assert "no multiple-choice tasks" in markdown
    assert "mc_limit" not in markdown and "decode_tokens" not in markdown
    assert list(pd.read_csv(art.file("summary.csv"))["method"]) == ["dense", "gprune"]


def test_a_run_is_one_model_whichever_of_its_artifacts_exist(store):
    """Perplexity alone for one model, speed alone for another: two runs, each with its
    own rows; a second perplexity artifact of a model, or another stage's key, is refused."""
    keys = [*fake_eval(store, "dense", 0.0, [], {"code": 8.0}, 0.3, stages=("perplexity",)),
            *fake_eval(store, "gprune", 0.5, ["code"], {"code": 12.0}, 0.3, stages=("speed",))]
    table = pd.read_parquet(store.read(run_report(ReportConfig(), store, keys)).file(
        "results.parquet"))
    kinds = {m: set(k) for m, k in table.groupby("method")["kind"]}
    assert kinds == {"dense": {"ppl", "size"}, "gprune": {"speed"}}
    other = fake_eval(store, "dense", 0.0, [], {"code": 9.0}, 0.3, stages=("perplexity",),
                      ppl_tokens=1024)
    with pytest.raises(ConfigError, match="two perplexity artifacts of one model"):
        run_report(ReportConfig(), store, [*keys, *other])
    report = run_report(ReportConfig(), store, keys)
    with pytest.raises(ConfigError, match="is a report artifact"):
        run_report(ReportConfig(), store, [*keys, report])


def test_report_needs_evaluations(store):
    with pytest.raises(ConfigError, match="run the perplexity, choice or speed stage"):
        run_report(ReportConfig(), store, [])


def test_publish_outside_a_run_does_nothing(store, eval_keys):
    art = store.read(run_report(ReportConfig(), store, eval_keys))
    assert publish.publish_to_prefect(art.path) is False


def test_publish_inside_a_run_creates_keyed_artifacts(store, eval_keys, monkeypatch):
    import prefect.artifacts
    import prefect.context

    art = store.read(run_report(ReportConfig(), store, eval_keys))
    calls = {}
    monkeypatch.setattr(prefect.context, "get_run_context", lambda: object())
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact",
                        lambda markdown, key, description: calls.update(md=(key, markdown)))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact",
                        lambda table, key, description: calls.update(table=(key, table)))
    assert publish.publish_to_prefect(art.path) is True
    assert calls["md"][0] == "gprune-report" and calls["md"][1].startswith("# gprune results")
    key, table = calls["table"]
    assert key == "gprune-results" and len(table) == 5
    dense = table[0]
    assert dense["method"] == "dense" and dense["ppl in (geo)"] is None  # NaN made JSON-safe
    assert not any(isinstance(v, float) and math.isnan(v) for row in table for v in row.values())
