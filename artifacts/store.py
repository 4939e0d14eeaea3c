"""Content-addressed artifact store.

Every stage output is a folder ``<root>/<stage>/<key>`` where ``key`` is
``<stage>-<hash>`` and the hash covers everything the output depends on (model
fingerprint, input artifact keys, parameters, and the digest of the stage's code,
``artifacts.code_digest``). A folder is built under ``<root>/.tmp`` and renamed into
place only after its manifest, written last, is on disk: a reader never sees a
half-written artifact, and a killed write leaves only a temporary folder that the
next write sweeps away.

The manifest records every file's size and sha256. ``read`` checks every size and
the hash of every file up to ``HASH_LIMIT`` bytes (larger ones: ``gprune verify``);
a corrupt artifact raises ``CorruptArtifactError`` and ``quarantine`` moves it aside
to ``<root>/.quarantine/<key>.<UTC time>`` (never deleted).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from artifacts.code_digest import stage_digest
from gprune import __version__ as CODE_VERSION
from gprune.errors import ArtifactError, CorruptArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STORE_ENV = "GPRUNE_STORE"
DEFAULT_ROOT = Path.home() / ".cache" / "gprune" / "store"
STALE_TMP_SECONDS = 6 * 3600
HASH_LIMIT = 16 * 2**20  # read() hashes files up to this size; sizes are always checked
CHUNK = 2**20
QUARANTINE = ".quarantine"


def default_root() -> Path:
    """The store location: $GPRUNE_STORE, else ~/.cache/gprune/store."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_ROOT).expanduser()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(stage: str, spec: dict[str, Any]) -> str:
    """Key of a stage output: the stage name, its code digest and a hash of its whole spec."""
    payload = canonical_json({"stage": stage, "code_digest": stage_digest(stage).digest, **spec})
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "pyarrow", "scikit-learn", "prefect", "lm-eval"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


@dataclass(frozen=True)
class Artifact:
    """A complete artifact on disk: its folder and its manifest."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params", {})

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest.get("extra", {})

    def file(self, name: str) -> Path:
        return self.path / name


class ArtifactStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_root()

    # ---- locations -------------------------------------------------------
    def path(self, key: str) -> Path:
        stage = key.rsplit("-", 1)[0]
        return self.root / stage / key

    def exists(self, key: str) -> bool:
        return (self.path(key) / MANIFEST).is_file()

    def keys(self) -> list[str]:
        """Keys of every published artifact (a manifest on disk), intact or not."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/*/" + MANIFEST)
                      if not p.parent.parent.name.startswith("."))

    # ---- reading ---------------------------------------------------------
    def read(self, key: str, stage: str | None = None,
             hash_limit: int | None = HASH_LIMIT) -> Artifact:
        """Load and verify an artifact; refuse a missing, partial, corrupt or mismatched one.

        Every file's size is checked, and the sha256 of files up to ``hash_limit`` bytes
        (None: every file; 0: sizes only). Manifests without hashes get sizes only.
        """
        folder = self.path(key)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(
                f"artifact {key} is not in the store at {self.root} (missing or incomplete); "
                "run the stage that produces it first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CorruptArtifactError(key, f"unreadable manifest ({err})") from err
        self._verify(key, folder, manifest, stage, hash_limit)
        return Artifact(key=key, path=folder, manifest=manifest)

    def _verify(self, key: str, folder: Path, manifest: dict, stage: str | None,
                hash_limit: int | None) -> None:
        if not isinstance(manifest, dict) or manifest.get("key") != key \
                or manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptArtifactError(key, "manifest does not match its folder")
        if stage is not None and manifest.get("stage") != stage:
            raise ArtifactError(f"artifact {key} is a {manifest.get('stage')!r} artifact, "
                                f"expected a {stage!r} artifact")
        for name, info in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise CorruptArtifactError(key, f"file {name} is missing or truncated")
            digest = info.get("sha256")
            if digest and (hash_limit is None or info["bytes"] <= hash_limit) \
                    and file_sha256(path) != digest:
                raise CorruptArtifactError(key, f"file {name} does not match its sha256")

    def list(self) -> list[Artifact]:
        """Artifacts whose manifest and file sizes check out (hashes: ``gprune verify``)."""
        found = []
        for key in self.keys():
            with contextlib.suppress(ArtifactError):
                found.append(self.read(key, hash_limit=0))
        return found

    def quarantine(self, key: str) -> Path | None:
        """Move an artifact's folder to ``<root>/.quarantine/<key>.<UTC time>`` (atomic
        rename; nothing is deleted). None when the folder is already gone."""
        target = self.root / QUARANTINE / f"{key}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        candidate, n = target, 1
        while candidate.exists():
            candidate, n = target.with_name(f"{target.name}-{n}"), n + 1
        try:
            os.replace(self.path(key), candidate)
        except FileNotFoundError:
            return None  # another process moved it first
        return candidate

    # ---- writing ---------------------------------------------------------
    @contextlib.contextmanager
    def write(self, key: str, stage: str, spec: dict[str, Any],
              replace: bool = False) -> Iterator["PendingArtifact"]:
        """Build an artifact in a temporary folder; publish it atomically on success.

        If the artifact already exists the new copy is discarded (the existing
        one is never touched) unless ``replace``: then the old folder is swapped
        out only after the new one is complete. On any exception the temporary
        folder is removed and the store is unchanged.
        """
        self._sweep_stale_tmp()
        tmp = self.root / ".tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        pending = PendingArtifact(key=key, stage=stage, spec=spec, path=tmp)
        try:
            yield pending
            pending.write_manifest()
            self._publish(tmp, self.path(key), replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, final: Path, replace: bool) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if (final / MANIFEST).is_file() and not replace:
            return  # someone finished the same artifact first: keep theirs
        if final.exists():  # swap the old folder out only now that the new one is whole
            old = tmp.with_name(tmp.name + ".old")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise

    def _sweep_stale_tmp(self) -> None:
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        now = time.time()
        for entry in tmp_root.iterdir():
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)


@dataclass
class PendingArtifact:
    """An artifact under construction. Stages write files into ``path``."""

    key: str
    stage: str
    spec: dict[str, Any]
    path: Path

    def __post_init__(self) -> None:
        self.started = time.time()
        self.extra: dict[str, Any] = {}

    def file(self, name: str) -> Path:
        return self.path / name

    def write_manifest(self) -> None:
        files = {
            str(p.relative_to(self.path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(self.path.rglob("*")) if p.is_file()
        }
        manifest = {
            "key": self.key,
            "stage": self.stage,
            "format_version": FORMAT_VERSION,
            "code_version": CODE_VERSION,
            **stage_digest(self.stage).manifest(),
            **self.spec,
            "extra": self.extra,
            "library_versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self.started, 3),
            "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values()),
        }
        tmp_manifest = self.path / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp_manifest, self.path / MANIFEST)
