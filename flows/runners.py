"""Task runner of the gprune flow: local threads (default), Dask or Ray.

Chosen by ``GPRUNE_TASK_RUNNER`` (``thread`` | ``dask`` | ``ray``) when the flow module
is imported (a deployment sets it in its job variables), or explicitly with
``flow_with_runner(kind, address)``. ``GPRUNE_TASK_RUNNER_ADDRESS`` points at an
existing cluster (``tcp://scheduler:8786`` for Dask, ``ray://head:10001`` for Ray);
without it Dask starts a local cluster for the flow run. ``GPRUNE_MAX_WORKERS`` caps
the local thread runner (default 2: mapped stages load a model copy each). On Ray,
``GPRUNE_RAY_GPUS`` / ``GPRUNE_RAY_CPUS`` are what each model stage asks Ray for
(``flows.ray_runner``; Ray hides the GPUs from a task that asks for none). Multi-node
recipes: docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import os
from typing import Optional

from gprune.errors import ConfigError

RUNNER_ENV = "GPRUNE_TASK_RUNNER"
ADDRESS_ENV = "GPRUNE_TASK_RUNNER_ADDRESS"
WORKERS_ENV = "GPRUNE_MAX_WORKERS"
KINDS = ("thread", "dask", "ray")


def make_task_runner(kind: Optional[str] = None, address: Optional[str] = None, **kwargs):
    """A Prefect task runner of the given kind (default: $GPRUNE_TASK_RUNNER or thread)."""
    kind = (kind or os.environ.get(RUNNER_ENV) or "thread").strip().lower()
    address = address or os.environ.get(ADDRESS_ENV) or None
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        workers = kwargs.pop("max_workers", None) or int(os.environ.get(WORKERS_ENV) or 2)
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("the dask task runner needs prefect-dask: "
                              "pip install 'gprune[dask]'") from None
        if address:
            return DaskTaskRunner(address=address, **kwargs)
        return DaskTaskRunner(**kwargs)
    if kind == "ray":
        try:
            from flows.ray_runner import GpruneRayTaskRunner, options_from_env
        except ImportError:
            raise ConfigError("the ray task runner needs prefect-ray: "
                              "pip install 'gprune[ray]'") from None
        kwargs.setdefault("model_options", options_from_env())
        return GpruneRayTaskRunner(address=address, **kwargs)
    raise ConfigError(f"{RUNNER_ENV}={kind!r} is not one of {', '.join(KINDS)}")


def flow_with_runner(kind: Optional[str] = None, address: Optional[str] = None, **kwargs):
    """The gprune flow bound to a task runner, e.g. ``flow_with_runner("dask",
    "tcp://127.0.0.1:8786")(model="smollm2", sparsities=[0.2, 0.3])``."""
    from flows.gprune_flow import gprune_flow

    return gprune_flow.with_options(task_runner=make_task_runner(kind, address, **kwargs))
