"""Corruption that keeps a file's size: caught by read(), `gprune verify` and run_stage,
which quarantines the corrupt copy (never deletes it) and rebuilds the artifact."""
from __future__ import annotations

import json
import logging

import pytest

from artifacts.store import QUARANTINE
from gprune.cli import main
from gprune.errors import CorruptArtifactError
from tasks.base import run_stage, stage_spec

PLAN = {"target_sparsity": 0.3, "achieved_sparsity": 0.2991, "layers": [[0, 3, 5]]}


def build_plan(pending):
    pending.file("plan.json").write_text(json.dumps(PLAN))
    pending.file("modules.bin").write_bytes(bytes(range(256)) * 8)


def flip_digit(path) -> None:
    """Change one digit: same size, different content."""
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit() and c != "0")
    path.write_text(text[:i] + "0" + text[i + 1:])


@pytest.fixture
def plan(store):
    return run_stage(store, "allocate", stage_spec("m", {"score": "score-x"}, {"s": 0.3}), build_plan)


def test_manifest_records_hashes_and_code_digest(store, plan):
    manifest = store.read(plan).manifest
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["code_digest"] and "tasks.allocate" in manifest["code_modules"]
    assert manifest["code_version"]


def test_same_size_edit_is_caught_by_read(store, plan):
    path = store.path(plan) / "plan.json"
    size = path.stat().st_size
    flip_digit(path)
    assert path.stat().st_size == size
    with pytest.raises(CorruptArtifactError, match="plan.json does not match its sha256"):
        store.read(plan)
    store.read(plan, hash_limit=0)  # sizes only
    assert [a.key for a in store.list()] == [plan]  # ls still lists it


def test_files_above_the_hash_limit_get_sizes_only(store, plan):
    path = store.path(plan) / "modules.bin"
    path.write_bytes(b"\x01" + path.read_bytes()[1:])
    store.read(plan, hash_limit=100)  # 2048 bytes > limit: size checked only
    with pytest.raises(CorruptArtifactError, match="modules.bin"):
        store.read(plan, hash_limit=None)


def test_old_manifests_without_hashes_still_read(store, plan, monkeypatch, capsys):
    manifest_path = store.path(plan) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["files"].values():
        del info["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    assert store.read(plan).key == plan
    monkeypatch.setenv("GPRUNE_STORE", str(store.root))
    assert main(["-q", "--store", str(store.root), "verify", plan]) == 0
    assert "ok (sizes only" in capsys.readouterr().out


def test_gprune_verify(store, plan, monkeypatch, capsys):
    monkeypatch.setenv("GPRUNE_STORE", str(store.root))  # main() sets it; restored after
    other = run_stage(store, "score", stage_spec("m", {}, {}), build_plan)
    cli = ["-q", "--store", str(store.root), "verify"]
    assert main(cli) == 0
    assert capsys.readouterr().out.count(" ok") == 2

    flip_digit(store.path(plan) / "plan.json")
    assert main(cli) == 1
    out = capsys.readouterr().out
    assert f"{plan}" in out and "CORRUPT: file plan.json does not match its sha256" in out
    assert f"{other:32s} ok" in out
    assert main(cli + [other]) == 0
    capsys.readouterr()

    assert main(cli + ["plan-0000000000000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no artifact plan-0000000000000000" in err[0]

    assert main(cli + ["--quarantine", plan]) == 1
    assert "moved to" in capsys.readouterr().out
    assert not store.exists(plan) and len(list((store.root / QUARANTINE).iterdir())) == 1
    assert main(cli) == 0
    assert main(["-q", "--store", str(store.root), "ls"]) == 0
    assert "(1 artifacts)" in capsys.readouterr().out


def test_run_stage_quarantines_and_rebuilds(store, plan, caplog):
    flip_digit(store.path(plan) / "plan.json")
    built = []
    with caplog.at_level(logging.WARNING, logger="gprune"):
        key = run_stage(store, "allocate", stage_spec("m", {"score": "score-x"}, {"s": 0.3}),
                        lambda p: (built.append(1), build_plan(p)))
    assert key == plan and built == [1]
    assert json.loads(store.read(plan, hash_limit=None).file("plan.json").read_text()) == PLAN
    moved = list((store.root / QUARANTINE).glob(f"{plan}.*"))
    assert len(moved) == 1 and json.loads((moved[0] / "plan.json").read_text()) != PLAN
    assert str(moved[0]) in caplog.text and "failed verification" in caplog.text
    assert [a.key for a in store.list()] == [plan]


def test_downstream_read_of_corrupt_input_says_what_to_do(store, plan):
    flip_digit(store.path(plan) / "plan.json")
    with pytest.raises(CorruptArtifactError, match="rerun its stage"):
        store.read(plan, stage="allocate")
