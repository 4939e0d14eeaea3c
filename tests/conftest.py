"""Shared fixtures: a temporary artifact store and tiny models of every family."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from artifacts.store import ArtifactStore  # noqa: E402
from gprune.models.adapters import ADAPTERS  # noqa: E402

FAMILIES = sorted(ADAPTERS)


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
