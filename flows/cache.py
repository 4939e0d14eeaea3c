"""Prefect caching keyed on artifact keys, never trusted without the artifact on disk.

A stage task's Prefect cache key IS the artifact key its stage produced (the same
content hash the store uses). Before a run the key is not known, so every finished
task records ``request -> artifact key`` in ``<store>/.prefect-requests/``, where the
request is a hash of the task name, the code digest of the stage the task runs
(``artifacts.code_digest``; edited stage code is a new request) and the task's inputs
(stage config, input artifact keys, model fingerprint or source stamp). ``compute_key``:

- ``force=True``: no cache key, the stage recomputes;
- no record, or the recorded artifact is missing from the store or fails verification
  (sizes, and hashes of files up to ``HASH_LIMIT``): no cache key, the task runs and
  ``run_stage`` reuses or rebuilds the artifact (so a wiped Prefect cache never
  recomputes anything, and a deleted or corrupt artifact is never served from Prefect's
  cache: ``run_stage`` quarantines the corrupt copy and rebuilds it);
- otherwise: the artifact key, and Prefect returns its cached value, which is that key.

A task that ran without a cache key writes its result under the artifact key itself,
so the next flow run is served from Prefect's cache. A value is only ever stored under
the key it equals.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from artifacts.code_digest import stage_digest
from artifacts.store import MANIFEST, ArtifactStore, canonical_json
from gprune.errors import ArtifactError

RECORDS = ".prefect-requests"
NOT_IDENTITY = ("force", "store_root")  # inputs that do not change the artifact


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def request_id(task_name: str, inputs: dict[str, Any]) -> str:
    """Hash of what a task was asked to do (everything its artifact key depends on)."""
    identity = {k: _jsonable(v) for k, v in sorted(inputs.items()) if k not in NOT_IDENTITY}
    code = stage_digest(task_name).digest
    payload = canonical_json({"task": task_name, "code_digest": code, "inputs": identity})
    return f"{task_name}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def _record_path(store: ArtifactStore, request: str) -> Path:
    return store.root / RECORDS / f"{request}.json"


def recorded_key(store: ArtifactStore, request: str) -> Optional[str]:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads(_record_path(store, request).read_text())["key"]
    return None


def record(store: ArtifactStore, request: str, key: str) -> None:
    """Remember ``request -> key`` (atomic write)."""
    path = _record_path(store, request)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"key": key, "recorded": time.time()}))
    os.replace(tmp, path)


@dataclass
class ArtifactKeyCache(CachePolicy):
    """Cache key = the recorded artifact key, only while that artifact exists and verifies."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> Optional[str]:
        if inputs.get("force"):
            return None
        store = ArtifactStore(inputs.get("store_root"))
        key = recorded_key(store, request_id(task_ctx.task.name, inputs))
        if not key:
            return None
        try:
            store.read(key)
        except ArtifactError:
            return None  # gone or corrupt: the task runs, run_stage rebuilds it
        return key


ARTIFACT_CACHE = ArtifactKeyCache()


def run_cached(stage: str, store_root: str, produce: Callable[[ArtifactStore], str]) -> str:
    """Run a stage function inside a stage task; record and publish its key to the cache."""
    from prefect.results import get_result_store
    from prefect.transactions import get_transaction

    logger = get_run_logger()
    context = TaskRunContext.get()
    store = ArtifactStore(store_root)
    started = time.time()
    key = produce(store)
    manifest = store.path(key) / MANIFEST
    built = manifest.is_file() and manifest.stat().st_mtime >= started
    logger.info("%s: %s %s (%.1fs)", stage, "built" if built else "reused", key,
                time.time() - started)
    if context is None:
        return key
    record(store, request_id(context.task.name, context.parameters), key)
    txn = get_transaction()
    if txn is not None and txn.key and txn.key != key:
        txn.write_on_commit = False  # never store a value under another key
    elif txn is None or not txn.key:
        with contextlib.suppress(Exception):  # best effort: the next run is then a cache hit
            get_result_store().write(obj=key, key=key)
    return key


def source_stamp(source: str) -> str:
    """What identifies a corpus source's content before loading it: a local file's
    size and mtime, otherwise the name (built-in sources are fixed per package)."""
    path = Path(source).expanduser()
    if path.is_file():
        info = path.stat()
        return f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}"
    return source
