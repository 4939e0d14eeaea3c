"""Artifact store: atomic writes, refusal of partial artifacts, reruns complete them."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from artifacts.store import ArtifactStore, artifact_key
from gprune.errors import ArtifactError
from tasks.base import run_stage, stage_spec


def _build_two_files(pending):
    pending.file("a.txt").write_text("alpha")
    pending.file("b.bin").write_bytes(b"\x00" * 1000)


def test_write_then_read(store):
    spec = stage_spec("m", {"x": "y"}, {"p": 1})
    key = run_stage(store, "demo", spec, _build_two_files)
    art = store.read(key, stage="demo")
    assert art.file("a.txt").read_text() == "alpha"
    assert art.manifest["params"] == {"p": 1} and art.manifest["inputs"] == {"x": "y"}
    assert art.manifest["files"]["b.bin"]["bytes"] == 1000
    assert [a.key for a in store.list()] == [key]


def test_key_depends_on_everything():
    base = stage_spec("m", {"x": "y"}, {"p": 1})
    keys = {artifact_key("demo", base), artifact_key("demo", stage_spec("m2", {"x": "y"}, {"p": 1})),
            artifact_key("demo", stage_spec("m", {"x": "z"}, {"p": 1})),
            artifact_key("demo", stage_spec("m", {"x": "y"}, {"p": 2})),
            artifact_key("other", base)}
    assert len(keys) == 5
    assert artifact_key("demo", base) == artifact_key("demo", stage_spec("m", {"x": "y"}, {"p": 1}))


def test_failed_build_leaves_nothing(store):
    def boom(pending):
        pending.file("a.txt").write_text("half")
        raise RuntimeError("killed")

    spec = stage_spec("m", {}, {})
    with pytest.raises(RuntimeError):
        run_stage(store, "demo", spec, boom)
    key = artifact_key("demo", spec)
    assert not store.exists(key)
    with pytest.raises(ArtifactError, match="missing or incomplete"):
        store.read(key)
    assert run_stage(store, "demo", spec, _build_two_files) == key
    assert store.read(key).file("a.txt").read_text() == "alpha"


def test_killed_process_leaves_no_readable_artifact(store, tmp_path):
    """A writer killed by SIGKILL mid-write leaves nothing readers accept; a rerun completes."""
    script = textwrap.dedent(f"""
        import os, signal
        from artifacts.store import ArtifactStore
        from tasks.base import run_stage, stage_spec
        def build(p):
            p.file("a.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        run_stage(ArtifactStore({str(store.root)!r}), "demo", stage_spec("m", {{}}, {{}}), build)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode != 0
    key = artifact_key("demo", stage_spec("m", {}, {}))
    assert not store.exists(key) and store.list() == []
    run_stage(store, "demo", stage_spec("m", {}, {}), _build_two_files)
    assert store.read(key).file("a.txt").read_text() == "alpha"


def test_truncated_or_mismatched_artifact_is_refused(store):
    key = run_stage(store, "demo", stage_spec("m", {}, {}), _build_two_files)
    art = store.read(key)
    art.file("b.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="truncated"):
        store.read(key)
    with pytest.raises(ArtifactError, match="expected a 'capture' artifact"):
        art.file("b.bin").write_bytes(b"\x00" * 1000)
        store.read(key, stage="capture")
    manifest = json.loads(art.file("manifest.json").read_text())
    manifest["key"] = "demo-0000"
    art.file("manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match"):
        store.read(key)


def test_force_replaces_atomically_and_existing_survives_failure(store):
    spec = stage_spec("m", {}, {})
    key = run_stage(store, "demo", spec, _build_two_files)

    def boom(pending):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(store, "demo", spec, boom, force=True)
    assert store.read(key).file("a.txt").read_text() == "alpha"

    def other(pending):
        pending.file("a.txt").write_text("beta")

    run_stage(store, "demo", spec, other, force=True)
    assert store.read(key).file("a.txt").read_text() == "beta"
