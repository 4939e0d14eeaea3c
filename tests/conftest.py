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


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect API for the whole session; results in a temporary folder."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH,
                                  temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=60):
        with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}):
            yield {"url": PREFECT_API_URL.value(), "results": results}
