"""Check (or stamp) that requirements/cpu.txt was compiled from today's pyproject.toml.

    python scripts/check_lock.py            # exit 1 with a one-line fix when the lock is stale
    python scripts/check_lock.py --stamp    # after pip-compile: record the inputs' digest

The digest covers what the resolution depends on: ``requires-python``, the dependencies,
the optional dependencies and ``constraints.txt`` (comments and blank lines ignored). It is
stored as the lock's first line, ``# gprune-lock-input: sha256:<hex>``, so editing a
dependency without re-locking is caught before ``pip`` installs anything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "cpu.txt"
MARKER = "# gprune-lock-input: "
LOCK_PYTHON = (3, 11)  # the interpreter the lock was resolved for (see README, "Dependencies")


def lock_inputs(root: Path = ROOT) -> dict:
    import tomllib  # Python >= 3.11; problem() checks the version first

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    constraints = [line.split("#")[0].strip()
                   for line in (root / "constraints.txt").read_text().splitlines()]
    return {"requires-python": project.get("requires-python", ""),
            "dependencies": sorted(project.get("dependencies", [])),
            "optional": {k: sorted(v) for k, v in
                         sorted(project.get("optional-dependencies", {}).items())},
            "constraints": sorted(c for c in constraints if c)}


def inputs_digest(root: Path = ROOT) -> str:
    text = json.dumps(lock_inputs(root), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines()[:3]:
        if line.startswith(MARKER):
            return line[len(MARKER):].strip()
    return None


def stamp(lock: Path, digest: str) -> None:
    lines = [ln for ln in lock.read_text().splitlines() if not ln.startswith(MARKER)]
    tmp = lock.with_suffix(".tmp")
    tmp.write_text("\n".join([MARKER + digest, *lines]) + "\n")
    tmp.replace(lock)


def problem(root: Path = ROOT, lock: Path = LOCK) -> str | None:
    """None when the lock can be installed here, else a one-line message saying what to do."""
    if sys.version_info[:2] != LOCK_PYTHON:
        want = ".".join(map(str, LOCK_PYTHON))
        return (f"the lock is for CPython {want} (this is {sys.version.split()[0]}): "
                f"run with python{want}, e.g. `make test PYTHON=python{want}`")
    if not lock.exists():
        return f"{lock.relative_to(root)} is missing: run `make lock`"
    if recorded_digest(lock) != inputs_digest(root):
        return (f"{lock.relative_to(root)} does not match pyproject.toml/constraints.txt "
                "(a dependency changed without re-locking): run `make lock`, then `make test`")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamp", action="store_true", help="record the digest in the lock")
    args = parser.parse_args(argv)
    if args.stamp:
        stamp(LOCK, inputs_digest())
        return 0
    message = problem()
    if message:
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
