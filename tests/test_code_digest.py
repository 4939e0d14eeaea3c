"""Stage code digests: an edit to a stage's maths changes its keys and every downstream key,
never an upstream one; comments and docstrings change nothing (artifacts.code_digest)."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import artifacts.store as store_module
from artifacts.code_digest import (PACKAGES, STAGE_ROOTS, clear_cache, closure, imports_of,
                                   normalized_source, stage_digest)
from artifacts.store import artifact_key
from tasks.base import run_stage, stage_spec

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_OF_SCORE = ("corpus", "capture", "stats", "partition")
CHAIN = ("stats", "partition", "score", "path", "allocate", "surgery", "perplexity", "report")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the project's packages; keys and digests are computed against it."""
    root = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.setattr(store_module, "stage_digest", lambda stage: stage_digest(stage, root))
    clear_cache()
    yield root
    clear_cache()


def digests(root: Path) -> dict[str, str]:
    clear_cache()
    return {stage: stage_digest(stage, root).digest for stage in STAGE_ROOTS}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def chained_keys() -> dict[str, str]:
    """Keys of a chain of specs, each stage taking the previous stage's key as input."""
    keys = {"capture": artifact_key("capture", stage_spec("m", {"corpus": "corpus-x"}, {}))}
    previous = keys["capture"]
    for stage in CHAIN:
        keys[stage] = previous = artifact_key(stage, stage_spec("m", {"in": previous}, {}))
    return keys


def test_real_digests_are_stable_and_differ_between_stages():
    first = {s: stage_digest(s) for s in STAGE_ROOTS}
    clear_cache()
    second = {s: stage_digest(s) for s in STAGE_ROOTS}
    assert first == second
    assert len({d.digest for d in first.values()}) == len(STAGE_ROOTS)
    assert "gprune.maths.score" in first["score"].modules
    assert "gprune/maths/capture_kernels.c" in first["capture"].files
    assert any(f.endswith(".tmpl") for f in first["surgery"].files)
    assert "artifacts.store" not in first["score"].modules  # plumbing is not hashed


def test_every_stage_of_the_tasks_has_roots():
    """Each stage name given to run_stage in tasks/*.py is declared in STAGE_ROOTS, with
    the module that builds it among its roots."""
    used = {}
    for path in (REPO / "tasks").glob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     for t in n.targets if isinstance(t, ast.Name)
                     and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage":
                arg = node.args[1]
                stage = arg.value if isinstance(arg, ast.Constant) else constants[arg.id]
                used[stage] = f"tasks.{path.stem}"
    assert set(used) == set(STAGE_ROOTS)
    assert all(module in STAGE_ROOTS[stage] for stage, module in used.items())


def test_maths_edit_changes_its_stage_and_downstream_only(tree):
    before, keys_before = digests(tree), chained_keys()
    users = {s for s in STAGE_ROOTS if "gprune.maths.score" in stage_digest(s, tree).modules}
    edit(tree / "gprune/maths/score.py", "SIGMA_EPS = 1e-9", "SIGMA_EPS = 1e-8")
    after, keys_after = digests(tree), chained_keys()

    changed = {s for s in STAGE_ROOTS if before[s] != after[s]}
    assert "score" in users and changed == users
    for stage in UPSTREAM_OF_SCORE:
        assert before[stage] == after[stage], stage
    moved = {s for s in keys_before if keys_before[s] != keys_after[s]}
    assert moved == {"score", "path", "allocate", "surgery", "perplexity", "report"}


def test_run_stage_rebuilds_after_a_maths_edit(tree, store):
    built = []

    def build(stage):
        return lambda pending: (built.append(stage), pending.file("x").write_text(stage))

    def chain():
        stats = run_stage(store, "stats", stage_spec("m", {}, {}), build("stats"))
        score = run_stage(store, "score", stage_spec("m", {"stats": stats}, {}), build("score"))
        plan = run_stage(store, "allocate", stage_spec("m", {"score": score}, {}), build("allocate"))
        return stats, score, plan

    first = chain()
    assert chain() == first and built == ["stats", "score", "allocate"]
    edit(tree / "gprune/maths/score.py", "SIGMA_EPS = 1e-9", "SIGMA_EPS = 1e-8")
    clear_cache()
    second = chain()
    assert second[0] == first[0] and second[1:] != first[1:]
    assert built == ["stats", "score", "allocate", "score", "allocate"]


def test_comments_docstrings_and_layout_do_not_change_digests(tree):
    before = digests(tree)
    edit(tree / "gprune/maths/score.py", "SIGMA_EPS = 1e-9",
         "# a new comment\n\nSIGMA_EPS = 1e-9  # explained")
    edit(tree / "gprune/maths/score.py", "Stage 4: reliability-gated", "Stage 4: gated")
    edit(tree / "gprune/maths/score.py",
         '"""The activation metric per unit: normalized mean over sources, or from pooled '
         'statistics."""', '"""Per-unit activation metric."""')
    assert digests(tree) == before


def test_resource_and_plumbing_edits(tree):
    before = digests(tree)
    with open(tree / "gprune/maths/capture_kernels.c", "a") as f:
        f.write("\n/* edited */\n")
    with open(tree / "artifacts/store.py", "a") as f:
        f.write("\nEXTRA = 1\n")
    after = digests(tree)
    assert {s for s in STAGE_ROOTS if before[s] != after[s]} == {
        s for s in STAGE_ROOTS if "gprune/maths/capture_kernels.c" in stage_digest(s, tree).files}
    assert before["capture"] != after["capture"] and before["score"] == after["score"]


def test_imports_inside_functions_submodules_and_relative_imports():
    source = ("import os\nfrom gprune.models import assets\nfrom . import sibling\n"
              "from ..maths.score import x\n"
              "def f():\n    from gprune.data.corpus import sample_sequences\n")
    found = imports_of(source, "gprune.models.loader", is_package=False)
    assert {"os", "gprune.models", "gprune.models.assets", "gprune.models.sibling",
            "gprune.maths.score", "gprune.data.corpus"} <= set(found)
    dirs = tuple((p, REPO / p) for p in PACKAGES)
    assert "gprune.models.assets" in closure(("gprune.models.loader",), dirs)


def test_request_id_follows_the_stage_code(tree, monkeypatch):
    import flows.cache as cache

    monkeypatch.setattr(cache, "stage_digest", lambda stage: stage_digest(stage, tree))
    inputs = {"config": {"a": 1}, "stats_key": "stats-x"}
    tasks = ("score", "allocate", "capture")
    before = {t: cache.request_id(t, inputs) for t in tasks}
    edit(tree / "gprune/maths/score.py", "SIGMA_EPS = 1e-9", "SIGMA_EPS = 1e-8")
    clear_cache()
    after = {t: cache.request_id(t, inputs) for t in tasks}
    assert before["score"] != after["score"] and before["capture"] == after["capture"]
    assert before["allocate"] == after["allocate"]  # allocate does not use maths.score
    with open(tree / "tasks/learning.py", "a") as f:  # allocate's code, not score's
        f.write("\nEDITED = 1\n")
    clear_cache()
    assert cache.request_id("allocate", inputs) != after["allocate"]
    assert cache.request_id("score", inputs) == after["score"]


def test_normalized_source_keeps_code_differences():
    assert normalized_source("x = 1  # c\n") == normalized_source('"""doc"""\n\nx = 1\n')
    assert normalized_source("x = 1\n") != normalized_source("x = 2\n")
    assert normalized_source("def f():\n    'doc'\n    return 1\n") == \
        normalized_source("def f():\n    return 1\n")


def test_a_method_found_by_name_is_in_its_stages_keys(tree):
    """The path and allocate stages reach GISP's allocator only through the registry, so
    their keys carry its module digest: an edit to GISP's maths changes it."""
    from artifacts.code_digest import module_digest

    assert "gprune.maths.gisp" not in stage_digest("path", tree).modules
    before = module_digest("gprune.methods.gisp", tree)
    assert module_digest("json", tree) == "" and before
    edit(tree / "gprune/maths/gisp.py", "NEVER = 2**31 - 1", "NEVER = 2**31 - 2")
    clear_cache()
    assert module_digest("gprune.methods.gisp", tree) != before
