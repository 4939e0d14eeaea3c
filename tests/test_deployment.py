"""End to end through a real Prefect server: scripts/prefect_local.sh up / deploy / worker,
``prefect deployment run gprune/full`` on a tiny configuration, then down.

The server listens on 127.0.0.1 on a free port with its SQLite database, PREFECT_HOME,
pid files and logs in a temporary state directory; everything started is stopped in a
``finally`` even when an assertion fails.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prefect_local.sh"
TINY = dict(model="tiny:llama", sources=["wikipedia", "docs"], eval_sources=["docs"],
            sparsities=[0.2], methods=["gprune"], capture_sequences=4, capture_seq_len=32,
            allocator_steps=3, eval_tokens=128, eval_seq_len=64, mc_tasks=[], speed=False,
            device="cpu")

pytestmark = pytest.mark.server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an unreaped zombie holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_deployment_run_through_local_server_and_worker(tmp_path):
    state = tmp_path / "prefect"
    env = {**os.environ, "GPRUNE_PREFECT_STATE": str(state),
           "GPRUNE_PREFECT_PORT": str(free_port()), "GPRUNE_PYTHON": sys.executable,
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    env.pop("PREFECT_API_URL", None)

    def local(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)

    started: dict[str, int] = {}
    try:
        up = local("up")
        assert up.returncode == 0, up.stderr[-3000:]
        started["server"] = int((state / "server.pid").read_text())
        deploy = local("deploy")
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        assert "gprune/full" in deploy.stdout and "gprune/nightly" in deploy.stdout
        worker = local("worker")
        assert worker.returncode == 0, worker.stderr[-3000:]
        started["worker"] = int((state / "worker.pid").read_text())

        params = json.dumps({"config": TINY, "store": str(tmp_path / "store")})
        run = local("run", "--params", params, "--watch-interval", "2", "--watch-timeout", "240",
                    timeout=300)
        output = run.stdout + run.stderr
        worker_log = (state / "worker.log").read_text()[-4000:]
        assert run.returncode == 0 and "finished successfully" in output, output[-3000:] + worker_log
        assert "prefect.artifact.created * gprune-report" in output  # published to the server

        reports = list((tmp_path / "store" / "report").glob("*/manifest.json"))
        assert len(reports) == 1, worker_log
        ArtifactStore(tmp_path / "store").read(reports[0].parent.name, stage="report")
    finally:
        down = local("down", timeout=90)
        assert down.returncode == 0, down.stderr
        for name, pid in started.items():
            assert not alive(pid), f"{name} (pid {pid}) still running after down"
        assert not list(state.glob("*.pid"))
