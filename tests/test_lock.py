"""The lock (requirements/cpu.txt) matches pyproject.toml, and a stale one is refused in one
line before anything is installed (scripts/check_lock.py)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("check_lock", REPO / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check_lock)


def copy_inputs(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "constraints.txt", "requirements/cpu.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def test_the_committed_lock_matches_pyproject():
    assert check_lock.problem() is None


def test_every_dependency_is_pinned_with_hashes():
    lock = (REPO / "requirements" / "cpu.txt").read_text()
    pins = {re.sub(r"[-_.]+", "-", m.group(1)).lower()
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==\S+ \\$", lock, re.M)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for ds in project["optional-dependencies"].values()
                                        for d in ds]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", d).group(0)).lower()
             for d in wanted}
    assert names <= pins, names - pins
    blocks = [b for b in re.split(r"\n(?=\S)", lock) if re.match(r"[A-Za-z0-9]", b)]
    assert blocks and all("--hash=sha256:" in b for b in blocks)


def test_an_edited_dependency_is_caught(tmp_path):
    root = copy_inputs(tmp_path)
    assert check_lock.problem(root, root / "requirements/cpu.txt") is None
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"tqdm",', '"tqdm>=4.99",'))
    message = check_lock.problem(root, root / "requirements/cpu.txt")
    assert "does not match pyproject.toml" in message and "make lock" in message
    assert "\n" not in message


def test_an_edited_constraint_is_caught_but_comments_are_not(tmp_path):
    root = copy_inputs(tmp_path)
    constraints = root / "constraints.txt"
    constraints.write_text("# a new comment\n" + constraints.read_text())
    assert check_lock.problem(root, root / "requirements/cpu.txt") is None
    constraints.write_text(constraints.read_text() + "numpy<2\n")
    assert check_lock.problem(root, root / "requirements/cpu.txt") is not None


def test_script_exits_nonzero_with_one_line(tmp_path):
    root = copy_inputs(tmp_path)
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "check_lock.py", root / "scripts")
    run = lambda: subprocess.run([sys.executable, str(root / "scripts/check_lock.py")],
                                 capture_output=True, text=True)
    assert run().returncode == 0
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pyyaml",', '"pyyaml", "rich",'))
    result = run()
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
