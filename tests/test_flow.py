"""The gprune Prefect flow on tiny models under prefect_test_harness.

One session-scoped harness (temporary API database) with Prefect's result storage in a
temporary folder. Covered: a flow run with two targets completes; a second run with one
more target recomputes no capture, stats, partition or score (artifact manifests and
task states); a deleted artifact is never served from Prefect's cache; a wiped Prefect
cache recomputes nothing; a run killed in the middle of a stage, rerun, completes
without using the half-written artifact; artifacts corrupted without changing size are
quarantined and rebuilt by the next run; the Dask task runner on a 2-worker cluster.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import numpy as np
import pytest

from artifacts.store import QUARANTINE, ArtifactStore
from gprune.configs.pipeline import PipelineConfig
from gprune.errors import CorruptArtifactError

REPO = Path(__file__).resolve().parents[1]
SHARED = ("capture", "stats", "partition", "score", "path")  # one per run, whatever the targets
TINY = dict(model="tiny:llama", sources=["wikipedia", "docs"], eval_sources=["wikipedia", "docs"],
            methods=["gprune"], capture_sequences=4, capture_seq_len=32, capture_batch_size=2,
            allocator_steps=3, eval_tokens=128, eval_seq_len=64, mc_tasks=[], mc_limit=5,
            speed=False, device="cpu")


def run_flow(store: Path, **overrides):
    """Run the flow; return (result dict, {task name: [state names]})."""
    from flows.gprune_flow import gprune_flow

    state = gprune_flow(config={**TINY, **overrides}, store=str(store), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


def task_states(flow_run_id, settle_reads: int = 60) -> dict[str, list[str]]:
    """Task name -> state names of a finished flow run. Prefect records task runs through
    its event pipeline, after the flow returns: flush this process's events, then read
    until three reads in a row agree and every state is final (at most ``settle_reads``
    reads, 0.5 s apart)."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    agreeing, previous = 0, None
    with get_client(sync_client=True) as client:
        for _ in range(settle_reads):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])))
            seen = sorted((run.task_key, run.state.name if run.state else "") for run in runs)
            final = all(run.state and run.state.is_final() for run in runs)
            agreeing = agreeing + 1 if seen == previous and final else 0
            if agreeing == 2:
                break
            previous = seen
            time.sleep(0.5)
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.task_key.split("-")[0], []).append(run.state.name)
    return found


def manifests(store: Path, stages=SHARED) -> dict[str, int]:
    """Key -> manifest mtime (ns) of every artifact of the given stages."""
    return {p.parent.name: p.stat().st_mtime_ns
            for stage in stages for p in sorted((store / stage).glob("*/manifest.json"))}


def test_flow_parameters_are_the_pipeline_config():
    """One declaration: the flow takes a PipelineConfig (Prefect builds its schema from it)."""
    from prefect.utilities.callables import parameter_schema

    from flows.gprune_flow import gprune_flow

    params = inspect.signature(gprune_flow.fn).parameters
    assert list(params) == ["config", "store"]
    assert params["config"].annotation in (PipelineConfig, "PipelineConfig")
    assert params["config"].default == PipelineConfig()
    schema = parameter_schema(gprune_flow.fn).model_dump()
    config_schema = schema["definitions"]["PipelineConfig"]["properties"]
    assert set(config_schema) == set(PipelineConfig.model_fields)
    assert config_schema["sparsities"]["description"] == \
        PipelineConfig.model_fields["sparsities"].description


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    store = tmp_path_factory.mktemp("flow") / "store"
    result, states = run_flow(store, sparsities=[0.2, 0.3])
    return store, result, states


def test_two_targets_complete(first_run):
    store_root, result, states = first_run
    store = ArtifactStore(store_root)
    assert sorted(result["plans"]) == ["gprune@0.2", "gprune@0.3"]
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3"]
    assert all(list(run) == ["perplexity"] for run in result["evals"].values())  # no mc, speed
    keys = [result["stats"], result["report"], *result["plans"].values(),
            *result["checkpoints"].values(), *eval_keys(result)]
    for key in keys:
        store.read(key)  # complete and verified
    for stage in SHARED:
        assert len(list((store_root / stage).glob("*/manifest.json"))) == (2 if stage == "capture"
                                                                            else 1)
    report = (store.path(result["report"]) / "report.md").read_text()
    assert "gprune" in report and "dense" in report
    assert states["capture"] == ["Completed", "Completed"]
    assert states["publish"] == ["Completed"]


def eval_keys(result) -> list[str]:
    return [key for run in result["evals"].values() for key in run.values()]


def test_one_more_target_reuses_shared_stages(first_run, tmp_path, monkeypatch):
    """Run 2 adds a target, a multiple-choice task and speed; one plan artifact was deleted
    meanwhile: it is rebuilt, not served from Prefect's cache, nothing before the plan stage
    is recomputed, and no perplexity either (choice and speed are stages of their own)."""
    import gprune.eval.lm_eval_runner as runner

    store_root, first, _ = first_run
    task = tmp_path / "parity.jsonl"
    task.write_text("".join(json.dumps({"query": f"Q: {i} is?\nA:", "choices": ["odd", "even"],
                                        "gold": i % 2}) + "\n" for i in range(6)))
    monkeypatch.setattr(runner, "tasks_root", lambda: tmp_path / "tasks")
    before, ppl_before = manifests(store_root), manifests(store_root, ("perplexity",))
    shutil.rmtree(ArtifactStore(store_root).path(first["plans"]["gprune@0.2"]))

    result, states = run_flow(store_root, sparsities=[0.2, 0.3, 0.4], speed=True,
                              mc_tasks=[str(task)], mc_limit=4)

    assert manifests(store_root) == before  # same artifacts, none rewritten
    for stage in SHARED:
        assert states[stage] and set(states[stage]) == {"Cached"}, (stage, states[stage])
    assert result["plans"]["gprune@0.2"] == first["plans"]["gprune@0.2"]
    ArtifactStore(store_root).read(result["plans"]["gprune@0.2"])  # rebuilt
    assert states["allocate"].count("Cached") == 1  # 0.3; 0.2 rebuilt, 0.4 new
    assert result["evals"]["dense"]["perplexity"] == first["evals"]["dense"]["perplexity"]
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3", "gprune@0.4"]
    assert all(list(run) == ["perplexity", "choice", "speed"] for run in result["evals"].values())
    ppl_after = manifests(store_root, ("perplexity",))
    assert {k: ppl_after[k] for k in ppl_before} == ppl_before and len(ppl_after) == 4
    assert states["perplexity"].count("Cached") == 3 and states["speed"] == ["Completed"] * 4
    assert states["choice"] == ["Completed"] * 4
    report = (ArtifactStore(store_root).path(result["report"]) / "report.md").read_text()
    assert "parity acc" in report and "decode tok/s" in report
    speed = ArtifactStore(store_root).read(result["evals"]["gprune@0.4"]["speed"])
    assert "decode_speedup" in set(pd.read_parquet(speed.file("results.parquet"))["name"])


def test_export_stage_writes_gguf_that_llama_cpp_runs(first_run):
    """``export``: each checkpoint as a GGUF artifact (upstream cached), whose logits in
    llama.cpp equal the checkpoint's in transformers (tiny byte tokenizer, no merges)."""
    from tests.test_export_gguf import hf_logits, llama_cpp_logits

    store_root, first, _ = first_run
    result, states = run_flow(store_root, sparsities=[0.2], export="f32")
    assert set(states["surgery"]) == {"Cached"} and states["export"] == ["Completed"]
    assert set(states["perplexity"]) == {"Cached"}
    store = ArtifactStore(store_root)
    art = store.read(result["exports"]["gprune@0.2"], stage="export")
    assert art.extra["outtype"] == "f32" and art.manifest["inputs"]["model"] == \
        first["checkpoints"]["gprune@0.2"]
    summary = pd.read_csv(store.path(result["report"]) / "summary.csv").set_index("sparsity")
    assert summary.loc[0.2, "GGUF bytes"] == art.file("model-f32.gguf").stat().st_size
    assert np.isnan(summary.loc[0.0, "GGUF bytes"])          # the dense model was not exported
    ids = list(range(40, 52))
    ref = hf_logits(store.path(first["checkpoints"]["gprune@0.2"]) / "model", ids)
    got = llama_cpp_logits(art.file("model-f32.gguf"), ids)
    assert (np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max() < 1e-3


def test_wiped_prefect_cache_recomputes_nothing(first_run, prefect_api):
    store_root, _, _ = first_run
    before = manifests(store_root, SHARED + ("corpus", "allocate", "surgery"))
    results = Path(prefect_api["results"])
    shutil.rmtree(results)
    results.mkdir()

    _, states = run_flow(store_root, sparsities=[0.3], evaluate=False)

    assert manifests(store_root, SHARED + ("corpus", "allocate", "surgery")) == before
    for stage in SHARED:
        assert set(states[stage]) == {"Completed"}, (stage, states[stage])


KILLED_RUN = """
import os, sys, time
import artifacts.store as st
original = st.PendingArtifact.write_manifest
def stall(self):  # the score stage's files are written, its manifest never comes
    if self.stage == "score":
        open(os.environ["KILL_MARKER"], "w").close()
        time.sleep(600)
    original(self)
st.PendingArtifact.write_manifest = stall
from flows.gprune_flow import gprune_flow
gprune_flow(config=__PARAMS__, store=__STORE__)
"""


def test_killed_run_reruns_without_half_written_artifact(prefect_api, tmp_path):
    store_root = tmp_path / "store"
    marker = tmp_path / "score-started"
    params = {**TINY, "sparsities": [0.25], "evaluate": False}
    env = {**os.environ, "PREFECT_API_URL": prefect_api["url"], "KILL_MARKER": str(marker),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_api["results"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = textwrap.dedent(KILLED_RUN).replace("__PARAMS__", repr(params)).replace(
        "__STORE__", repr(str(store_root)))
    log = tmp_path / "killed-run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = list((store_root / ".tmp").glob("score-*/scores.parquet"))
    assert partial, "the kill did not happen in the middle of the score stage"
    assert not list((store_root / "score").glob("*/manifest.json"))

    result, states = run_flow(store_root, **params)

    store = ArtifactStore(store_root)
    score_dirs = list((store_root / "score").glob("*/manifest.json"))
    assert len(score_dirs) == 1
    score = store.read(score_dirs[0].parent.name, stage="score")
    assert score.file("scores.parquet").stat().st_mtime > partial[0].stat().st_mtime
    assert states["score"] == ["Completed"]
    for key in [*result["plans"].values(), *result["checkpoints"].values()]:
        store.read(key)


def flip_byte(path: Path) -> None:
    """Corrupt a file without changing its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_artifacts_are_quarantined_and_rebuilt(prefect_api, tmp_path):
    """Same-size corruption of a stats file and of plan.json: the next run moves both to
    quarantine, rebuilds them under the same keys (not served from Prefect's cache) and
    finishes; the stages in between are served from cache."""
    store_root, params = tmp_path / "store", dict(sparsities=[0.25], evaluate=False)
    first, _ = run_flow(store_root, **params)
    store = ArtifactStore(store_root)
    corrupted = {first["stats"]: "units.parquet", first["plans"]["gprune@0.25"]: "plan.json"}
    for key, name in corrupted.items():
        flip_byte(store.path(key) / name)
        with pytest.raises(CorruptArtifactError, match=name):
            store.read(key)

    result, states = run_flow(store_root, **params)

    assert result["stats"] == first["stats"] and result["plans"] == first["plans"]
    assert states["stats"] == ["Completed"] and states["allocate"] == ["Completed"]
    for stage in ("capture", "partition", "score", "path", "surgery"):
        assert set(states[stage]) == {"Cached"}, (stage, states[stage])
    for key, name in corrupted.items():
        store.read(key, hash_limit=None)  # rebuilt and whole
        moved = list((store_root / QUARANTINE).glob(f"{key}.*"))
        assert len(moved) == 1 and (moved[0] / name).is_file()
    assert sorted(a.key for a in store.list()) == sorted(store.keys())


def test_dask_task_runner_on_local_cluster(prefect_api, tmp_path):
    from distributed import LocalCluster

    from flows.runners import flow_with_runner

    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        runnable = flow_with_runner("dask", cluster.scheduler_address)
        state = runnable(config={**TINY, "model": "tiny:qwen2", "sparsities": [0.2, 0.3]},
                         store=str(tmp_path / "store"), return_state=True)
        executed = [w.state.executed_count for w in cluster.workers.values()]
    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3"]
    assert all(count > 0 for count in executed), executed  # both workers ran tasks
    assert sum(executed) >= 2 + 2 + 1 + 1 + 1 + 2 * 2 + 3 + 1  # corpus..perplexity, report
    ArtifactStore(tmp_path / "store").read(result["report"])


def test_bad_parameters_fail_before_any_task(prefect_api, tmp_path):
    from prefect.exceptions import ParameterTypeError

    from flows.gprune_flow import gprune_flow
    from gprune.errors import ConfigError

    with pytest.raises(ParameterTypeError, match="sparsities"):
        gprune_flow(config={**TINY, "sparsities": [1.5]}, store=str(tmp_path / "s"))
    with pytest.raises(ParameterTypeError, match="unknown method 'nope'"):
        gprune_flow(config={**TINY, "methods": ["nope"]}, store=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        PipelineConfig.build(**{**TINY, "methods": ["nope"]})   # what the CLI builds
    assert not (tmp_path / "s").exists()


def test_runner_choice_errors_are_one_line(monkeypatch):
    from flows.runners import make_task_runner
    from gprune.errors import ConfigError

    with pytest.raises(ConfigError, match="not one of"):
        make_task_runner("spark")
    monkeypatch.setenv("GPRUNE_TASK_RUNNER", "dask")
    assert type(make_task_runner()).__name__ == "DaskTaskRunner"
    assert type(make_task_runner("thread")).__name__ == "ThreadPoolTaskRunner"


def test_gisp_one_trajectory_serves_both_targets_and_reconstructions(prefect_api, tmp_path):
    """GISP through the flow: one path artifact (the trajectory) serves two targets and
    both reconstructions; the plans nest; the trajectory's per-round seconds are stored."""
    from gprune.maths.plan import PruningPlan

    spec = "gisp:heads=false,steps=2,sequences=2,seq_len=32"
    result, states = run_flow(tmp_path / "store", methods=[spec, f"{spec},reconstruct=lsq"],
                              sparsities=[0.2, 0.3])
    store = ArtifactStore(tmp_path / "store")
    paths = list((tmp_path / "store" / "path").glob("*/manifest.json"))
    assert len(paths) == 1 and len(result["plans"]) == 4
    rounds = store.read(paths[0].parent.name).extra["objective"]
    assert [r["step"] for r in rounds] == [1, 2] and all(r["seconds"] > 0 for r in rounds)
    from gprune.methods.registry import build_method

    label, refit = build_method(spec).label, build_method(f"{spec},reconstruct=lsq").label
    kept = {}
    for name, key in result["plans"].items():
        plan = PruningPlan.read(store.path(key))
        assert abs(plan.achieved_sparsity - plan.target_sparsity) <= 0.005
        kept[name] = {(l.layer, u) for l in plan.layers for u in l.mlp_keep}
    assert kept[f"{label}@0.3"] <= kept[f"{label}@0.2"] != kept[f"{label}@0.3"]
    assert kept[f"{label}@0.3"] == kept[f"{refit}@0.3"]


def test_tiny_gemma3_every_method_end_to_end(prefect_api, tmp_path):
    """Gemma 3's shape (4 query heads on 1 KV head, sliding-window and full layers, tied
    embeddings) through every built-in method: each checkpoint reloads with remote code
    and generates greedily with its cache, and the report lists every method."""
    import torch
    from transformers import AutoModelForCausalLM

    from gprune.methods.registry import BUILTINS, build_method

    gisp = "gisp:steps=2,sequences=2,seq_len=32"
    methods = [gisp if name == "gisp" else name for name in (*BUILTINS, "fang")]
    result, _ = run_flow(tmp_path / "store", model="tiny:gemma3", methods=methods,
                         sparsities=[0.3], eval_seq_len=32)
    labels = sorted(f"{build_method(m).label}@0.3" for m in methods)
    assert sorted(result["checkpoints"]) == labels
    assert sorted(result["evals"]) == sorted(["dense", *labels])
    store = ArtifactStore(tmp_path / "store")
    report = (store.path(result["report"]) / "report.md").read_text()
    prompt = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114]])  # > window
    for name, key in result["checkpoints"].items():
        folder = store.path(key) / "model"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        config = model.config
        assert config.num_key_value_heads == 1 and config.tie_word_embeddings
        assert all(layer["num_kv_heads"] in (0, 1) for layer in config.gprune_layers)
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 pad_token_id=258, output_logits=True,
                                 return_dict_in_generate=True)
            full = model(out.sequences).logits[0, prompt.shape[1] - 1:-1]       # (6, V)
        assert out.sequences.shape == (1, 16)
        cached = torch.cat(out.logits)                                          # (6, V)
        # cache == no cache, on the logits (a random tiny model's near-ties make argmax
        # comparisons flaky)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4, msg=name)
        assert name.split("@")[0] in report
