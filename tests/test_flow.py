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
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the whole session; results in a temporary folder."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH,
                                  temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=60):
        with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}):
            yield {"url": PREFECT_API_URL.value(), "results": results}


def run_flow(store: Path, **overrides):
    """Run the flow; return (result dict, {task name: [state names]})."""
    from flows.gprune_flow import gprune_flow

    state = gprune_flow(**{**TINY, **overrides}, store=str(store), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


def task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.task_key.split("-")[0], []).append(run.state.name)
    return found


def manifests(store: Path, stages=SHARED) -> dict[str, int]:
    """Key -> manifest mtime (ns) of every artifact of the given stages."""
    return {p.parent.name: p.stat().st_mtime_ns
            for stage in stages for p in sorted((store / stage).glob("*/manifest.json"))}


def test_flow_parameters_are_pipeline_config_fields():
    from flows.gprune_flow import gprune_flow

    params = inspect.signature(gprune_flow.fn).parameters
    assert set(params) == set(PipelineConfig.model_fields) | {"store"}
    defaults = PipelineConfig()
    for name in ("model", "sources", "sparsities", "capture_sequences", "device", "force"):
        assert params[name].default == getattr(defaults, name)
    flow_config = PipelineConfig(**{n: p.default for n, p in params.items() if n != "store"})
    assert flow_config == defaults


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
    keys = [result["stats"], result["report"], *result["plans"].values(),
            *result["checkpoints"].values(), *result["evals"].values()]
    for key in keys:
        store.read(key)  # complete and verified
    for stage in SHARED:
        assert len(list((store_root / stage).glob("*/manifest.json"))) == (2 if stage == "capture"
                                                                            else 1)
    report = (store.path(result["report"]) / "report.md").read_text()
    assert "gprune" in report and "dense" in report
    assert states["capture"] == ["Completed", "Completed"]
    assert states["publish"] == ["Completed"]


def test_one_more_target_reuses_shared_stages(first_run):
    """Run 2 adds a target; one plan artifact was deleted meanwhile: it is rebuilt, not
    served from Prefect's cache, and nothing before the plan stage is recomputed."""
    store_root, first, _ = first_run
    before = manifests(store_root)
    shutil.rmtree(ArtifactStore(store_root).path(first["plans"]["gprune@0.2"]))

    result, states = run_flow(store_root, sparsities=[0.2, 0.3, 0.4])

    assert manifests(store_root) == before  # same artifacts, none rewritten
    for stage in SHARED:
        assert states[stage] and set(states[stage]) == {"Cached"}, (stage, states[stage])
    assert result["plans"]["gprune@0.2"] == first["plans"]["gprune@0.2"]
    ArtifactStore(store_root).read(result["plans"]["gprune@0.2"])  # rebuilt
    assert states["allocate"].count("Cached") == 1  # 0.3; 0.2 rebuilt, 0.4 new
    assert result["evals"]["dense"] == first["evals"]["dense"]
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3", "gprune@0.4"]


def test_wiped_prefect_cache_recomputes_nothing(first_run, prefect_api):
    store_root, _, _ = first_run
    before = manifests(store_root, SHARED + ("corpus", "plan", "surgery"))
    results = Path(prefect_api["results"])
    shutil.rmtree(results)
    results.mkdir()

    _, states = run_flow(store_root, sparsities=[0.3], evaluate=False)

    assert manifests(store_root, SHARED + ("corpus", "plan", "surgery")) == before
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
gprune_flow(**__PARAMS__)
"""


def test_killed_run_reruns_without_half_written_artifact(prefect_api, tmp_path):
    store_root = tmp_path / "store"
    marker = tmp_path / "score-started"
    params = {**TINY, "sparsities": [0.25], "evaluate": False, "store": str(store_root)}
    env = {**os.environ, "PREFECT_API_URL": prefect_api["url"], "KILL_MARKER": str(marker),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(prefect_api["results"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    script = textwrap.dedent(KILLED_RUN).replace("__PARAMS__", repr(params))
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

    params.pop("store")
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
        state = runnable(**{**TINY, "model": "tiny:qwen2"}, sparsities=[0.2, 0.3],
                         store=str(tmp_path / "store"), return_state=True)
        executed = [w.state.executed_count for w in cluster.workers.values()]
    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3"]
    assert all(count > 0 for count in executed), executed  # both workers ran tasks
    assert sum(executed) >= 2 + 2 + 1 + 1 + 1 + 2 * 2 + 3 + 1  # corpus..evaluate, report
    ArtifactStore(tmp_path / "store").read(result["report"])


def test_bad_parameters_fail_before_any_task(prefect_api, tmp_path):
    from flows.gprune_flow import gprune_flow
    from gprune.errors import ConfigError

    with pytest.raises(ConfigError, match="sparsities"):
        gprune_flow(**{**TINY, "sparsities": [1.5]}, store=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="method"):
        gprune_flow(**{**TINY, "methods": ["nope"]}, store=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_runner_choice_errors_are_one_line(monkeypatch):
    from flows.runners import make_task_runner
    from gprune.errors import ConfigError

    with pytest.raises(ConfigError, match="not one of"):
        make_task_runner("spark")
    monkeypatch.setenv("GPRUNE_TASK_RUNNER", "dask")
    assert type(make_task_runner()).__name__ == "DaskTaskRunner"
    assert type(make_task_runner("thread")).__name__ == "ThreadPoolTaskRunner"
