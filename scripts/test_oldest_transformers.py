"""Run the pruned checkpoints' forward, cache and generation tests on the oldest transformers
that pyproject.toml admits (``requirements/oldest-transformers.txt``).

    python scripts/test_oldest_transformers.py     # `make test` runs it after the suite

The pinned wheels (hashes checked, no dependencies) go into
``.gprune/oldest-transformers/site``, which is put in front of the locked venv on
``PYTHONPATH`` for one pytest run of ``tests/test_surgery.py``; the folder is reinstalled
only when the requirements file changes. Exit status: pytest's (or pip's).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "oldest-transformers.txt"
OVERLAY = ROOT / ".gprune" / "oldest-transformers"
TESTS = ["tests/test_surgery.py", "-k", "masked_dense or cache_continuation or reloads"]


def install_overlay() -> Path:
    """The overlay's site folder, (re)installed when the requirements changed."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    site, stamp = OVERLAY / "site", OVERLAY / "installed"
    if stamp.is_file() and stamp.read_text() == digest and site.is_dir():
        return site
    OVERLAY.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OVERLAY, prefix=".site-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--require-hashes", "--target", str(tmp), "-r",
                    str(REQUIREMENTS)], check=True)
    if site.exists():
        shutil.rmtree(site)
    tmp.replace(site)
    stamp.write_text(digest)
    return site


def main() -> int:
    try:
        site = install_overlay()
    except subprocess.CalledProcessError as err:
        print(f"error: could not install {REQUIREMENTS.name} ({err}); check network access "
              "to the package index", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    version = subprocess.run([sys.executable, "-c", "import transformers as t; "
                              "print(t.__version__)"], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    print(f"pruned-checkpoint tests on transformers {version} (oldest admitted)")
    with tempfile.TemporaryDirectory() as cache:  # models converted by another version stay apart
        env["GPRUNE_CACHE"] = cache
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *TESTS], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
