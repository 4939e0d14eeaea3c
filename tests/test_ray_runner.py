"""The gprune flow on a local Ray cluster (prefect-ray), as tests/test_flow.py runs it on a
Dask LocalCluster: the mapped captures and the evaluations run as Ray tasks in Ray worker
processes, which reach the Prefect API (their task runs are recorded there, the report is
published there) and the artifact store (tasks exchange store paths and keys, never
tensors). The cluster is small (2 CPUs, no dashboard) and always shut down."""
from __future__ import annotations

import time

import pytest

from artifacts.store import ArtifactStore
from tests.test_flow import TINY, task_states

RAY_START_ATTEMPTS = 3
NODE_TIMEOUT = "timed out during startup"   # Ray's own message; see ray_cluster


@pytest.fixture
def ray_cluster():
    """A local 2-CPU Ray cluster for one test; shut down whatever happens.

    Ray 2.60's raylet waits a fixed 15 s for its dashboard agent to start; on a 2-core
    machine loaded by other jobs the agent can take longer and Ray gives up on the node.
    That startup is retried, then the test is skipped saying so (the flow is not at fault);
    any other error fails the test."""
    import ray

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     object_store_memory=100 * 2**20, namespace="gprune-test")
            break
        except Exception as err:  # Ray raises a bare Exception when its node times out
            ray.shutdown()
            if NODE_TIMEOUT not in str(err):
                raise
            if attempt == RAY_START_ATTEMPTS:
                pytest.skip(f"Ray's local node did not start in {attempt} tries (its agent "
                            "missed Ray's 15 s deadline: machine overloaded)")
    try:
        yield ray
    finally:
        ray.shutdown()


def worker_executions(ray, expected: int, settle_reads: int = 40) -> list[str]:
    """The Ray process ("worker:<id>" or "driver:<id>") of every task execution in Ray's
    task events (``ray.timeline``), read until there are ``expected`` of them (the events
    are flushed about once a second)."""
    for _ in range(settle_reads):
        events = ray.timeline()
        # Ray 2.60 names the process in ``tid``; the chrome-tracing dump maps an index to it
        process = {e["tid"]: e["args"]["name"] for e in events
                   if e.get("ph") == "M" and e.get("name") == "thread_name"}
        runs = [str(process.get(e["tid"], e["tid"])) for e in events
                if e.get("cat") == "task:execute"]
        if len(runs) >= expected:
            break
        time.sleep(0.5)
    return runs


def test_ray_task_runner_on_local_cluster(prefect_api, ray_cluster, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.runners import flow_with_runner
    from gprune.report.publish import MARKDOWN_KEY

    runnable = flow_with_runner("ray", model_options={"num_cpus": 1})  # joins the cluster
    state = runnable(config={**TINY, "model": "tiny:qwen2", "sparsities": [0.2, 0.3]},
                     store=str(tmp_path / "store"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert sorted(result["evals"]) == ["dense", "gprune@0.2", "gprune@0.3"]
    ArtifactStore(tmp_path / "store").read(result["report"])

    states = task_states(state.state_details.flow_run_id)     # recorded by the Ray workers
    assert states["capture"] == ["Completed"] * 2 and states["perplexity"] == ["Completed"] * 3
    assert states["publish"] == ["Completed"]               # publish-report: API I/O
    with get_client(sync_client=True) as client:
        published = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert MARKDOWN_KEY in {a.key for a in published}          # created by a Ray worker

    tasks = 2 + 2 + 1 + 1 + 1 + 2 * 2 + 3 + 1   # corpus..perplexity, report (as for Dask)
    runs = worker_executions(ray_cluster, tasks)
    assert len(runs) >= tasks and all(r.startswith("worker:") for r in runs), runs
    assert len(set(runs)) >= 2, runs    # the mapped captures ran side by side


def test_ray_runner_options_come_from_the_environment(monkeypatch):
    from flows.ray_runner import MODEL_TASKS
    from flows.runners import make_task_runner
    from gprune.errors import ConfigError

    monkeypatch.setenv("GPRUNE_RAY_GPUS", "0.5")
    monkeypatch.setenv("GPRUNE_RAY_CPUS", "4")
    runner = make_task_runner("ray", "ray://head:10001")
    assert type(runner).__name__ == "GpruneRayTaskRunner" and runner.address == "ray://head:10001"
    assert runner.model_options == {"num_gpus": 0.5, "num_cpus": 4.0}
    assert runner.duplicate() == runner       # what a flow run starts from keeps the options
    assert {"capture", "gram", "allocate", "surgery", "perplexity"} <= MODEL_TASKS
    assert not {"corpus", "report", "publish-report"} & MODEL_TASKS
    monkeypatch.setenv("GPRUNE_RAY_GPUS", "one")
    with pytest.raises(ConfigError, match="GPRUNE_RAY_GPUS='one' is not a positive number"):
        make_task_runner("ray")
