"""The gprune flow's Ray task runner: prefect-ray's, plus Ray resources for the model stages.

Ray hides every GPU from a task that asks for none (it sets ``CUDA_VISIBLE_DEVICES`` to
the empty string), so on a GPU cluster the stages that run the model must ask Ray for
one. ``model_options`` (``ray.remote`` options such as ``{"num_gpus": 1}`` or
``{"num_cpus": 4}``) go with every task of ``MODEL_TASKS``; the bookkeeping tasks
(corpus, partition, score, export, report, publish) keep Ray's default of one CPU. From the
environment: ``GPRUNE_RAY_GPUS`` and ``GPRUNE_RAY_CPUS`` (see ``options_from_env``).
Imported only when the Ray runner is chosen (prefect-ray is the ``ray`` extra).
"""
from __future__ import annotations

import os
from typing import Any, Optional

from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from gprune.errors import ConfigError

GPUS_ENV = "GPRUNE_RAY_GPUS"
CPUS_ENV = "GPRUNE_RAY_CPUS"
# tasks that load a model (or, for stats, its weights) and use every thread or the GPU
MODEL_TASKS = frozenset({"capture", "gram", "stats", "contexts", "path", "allocate", "surgery",
                         "perplexity", "choice", "speed", "neurons", "attribution"})


def options_from_env() -> dict[str, float]:
    """``{"num_gpus": $GPRUNE_RAY_GPUS, "num_cpus": $GPRUNE_RAY_CPUS}``, the unset ones left
    out; a fraction of a GPU (0.5) lets two model stages share one."""
    options = {}
    for env, option in ((GPUS_ENV, "num_gpus"), (CPUS_ENV, "num_cpus")):
        text = os.environ.get(env, "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise ConfigError(f"{env}={text!r} is not a positive number (e.g. 1 or 0.5)")
        options[option] = value
    return options


class GpruneRayTaskRunner(RayTaskRunner):
    """``RayTaskRunner`` whose model-stage tasks carry ``model_options``."""

    def __init__(self, address: Optional[str] = None,
                 init_kwargs: Optional[dict[str, Any]] = None,
                 model_options: Optional[dict[str, Any]] = None):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.model_options = dict(model_options or {})

    def duplicate(self) -> "GpruneRayTaskRunner":
        return type(self)(self.address, self.init_kwargs, self.model_options)

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return (self.address, self.init_kwargs, self.model_options) == \
            (other.address, other.init_kwargs, other.model_options)

    __hash__ = None

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if self.model_options and task.name in MODEL_TASKS:
            with remote_options(**self.model_options):
                return super().submit(task, parameters, wait_for, dependencies)
        return super().submit(task, parameters, wait_for, dependencies)
