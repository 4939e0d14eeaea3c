"""The one way a stage produces its artifact: compute the key, reuse or build atomically."""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Callable

from artifacts.store import ArtifactStore, PendingArtifact, artifact_key
from gprune.errors import CorruptArtifactError

log = logging.getLogger("gprune")
_BUILDING: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_BUILDING_GUARD = threading.Lock()


def stage_spec(model: str | None, inputs: dict[str, Any], params: dict[str, Any]) -> dict:
    """Everything an artifact depends on (the stage's code digest is added by the key)."""
    return {"model": model, "inputs": inputs, "params": params}


def runtime_code(cls: type, *static: str) -> dict[str, str]:
    """``{"code": digest}`` of the module defining ``cls`` when the stage reaches it only at
    run time (a method or allocator found by name), so editing it changes the stage's key;
    ``{}`` when it is one of ``static`` (already in the stage's own code digest)."""
    from artifacts.code_digest import module_digest

    return {} if cls.__module__ in static else {"code": module_digest(cls.__module__)}


def run_stage(store: ArtifactStore, stage: str, spec: dict[str, Any],
              build: Callable[[PendingArtifact], None], force: bool = False) -> str:
    """Return the key of the stage's artifact, building it only when it is not stored.

    ``force`` rebuilds and atomically replaces an existing artifact; a stored artifact
    that fails verification is quarantined and rebuilt. Threads of one process asking
    for the same artifact build it once (the others wait, then reuse it).
    """
    key = artifact_key(stage, spec)
    with _BUILDING_GUARD:
        lock = _BUILDING[key]
    with lock:
        if intact(store, stage, key) and not force:
            log.info("%s: reusing %s", stage, key)
            return key
        with store.write(key, stage, spec, replace=force) as pending:
            build(pending)
    log.info("%s: wrote %s", stage, key)
    return key


def intact(store: ArtifactStore, stage: str, key: str) -> bool:
    """Whether a stored artifact can be reused. One that fails verification (sizes, and
    hashes of files up to HASH_LIMIT) is moved to quarantine, never deleted."""
    if not store.exists(key):
        return False
    try:
        store.read(key)
        return True
    except CorruptArtifactError as err:
        moved = store.quarantine(key)
        log.warning("%s: %s failed verification (%s); moved it to %s, rebuilding it",
                    stage, key, err.problem, moved or "quarantine (by another process)")
        return False
