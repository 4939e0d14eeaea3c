"""The method registry and its lookups (what a method is: ``gprune.methods.base``).

Built-in methods live one per module next to this file; the first lookup imports
them, then every module or class exposed under the entry-point group
``gprune.methods`` (a third-party package's ``pyproject.toml``:
``[project.entry-points."gprune.methods"] mine = "my_package.my_method"``).
"""
from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from typing import Any, Union

from gprune.errors import ConfigError
from gprune.methods.base import METHODS, Method, MethodParams

log = logging.getLogger("gprune")
ENTRY_POINT_GROUP = "gprune.methods"
BUILTINS = ("gprune", "flap", "wanda_sp", "magnitude_sp", "gisp", "fang_flap", "fang_obc")  # listed first, in this order
MethodSpec = Union[str, dict[str, Any]]


@functools.lru_cache(maxsize=None)
def load_plugins() -> tuple[str, ...]:
    """Import the built-in methods and every installed plugin (once); their names."""
    from gprune.methods import gprune  # noqa: F401  (first: the default method)
    from gprune.methods import fang, flap, gisp, magnitude_sp, wanda_sp  # noqa: F401

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            point.load()
        except Exception as err:  # a broken plugin must not break gprune
            log.warning("method plugin %s (%s) failed to load: %s", point.name, point.value, err)
    return tuple(METHODS)


def method_names() -> tuple[str, ...]:
    """The built-in methods, then every other registered one by name."""
    load_plugins()
    return tuple(sorted(METHODS, key=lambda n: (BUILTINS.index(n) if n in BUILTINS
                                                 else len(BUILTINS), n)))


def method_class(name: str) -> type[Method]:
    load_plugins()
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: "
                          f"{', '.join(method_names())}")
    return METHODS[name]


def parse_spec(spec: MethodSpec) -> dict[str, Any]:
    """``"gprune:k=1,gate=false"`` or a dict -> ``{"name": ..., params...}`` (values of a
    string spec are parsed as JSON where they can be: numbers, true/false, lists)."""
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ConfigError(f"a method dict needs a 'name'; got {spec}")
        return dict(spec)
    name, _, rest = str(spec).strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"method spec {spec!r}: expected name:key=value,...; got {item!r}")
        params[key.strip()] = _value(value.strip())
    return {"name": name, **params}


def build_method(spec: MethodSpec) -> Method:
    """A validated method instance from a spec (one-line ConfigError on any problem)."""
    params = parse_spec(spec)
    return method_class(params.pop("name"))(**params)


def _value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


__all__ = ["Method", "MethodParams", "MethodSpec", "build_method", "method_class",
           "method_names", "parse_spec", "load_plugins", "ENTRY_POINT_GROUP"]
