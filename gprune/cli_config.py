"""Command-line options generated from a typed config (every parameter declared once).

``add_config_arguments`` adds one ``--field-name`` option per pydantic field, with the
field's default and description as help; ``config_from_args`` builds the config back
(one-line ``ConfigError`` on bad values). Types: str/int/float, bool (``--x`` /
``--no-x``), Optional[...], Literal choices, and lists or ``tuple[X, ...]`` (``nargs``).
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without Optional, whether it is a list or a tuple[X, ...])."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str   # e.g. Union[str, dict]: str on a CLI
    if typing.get_origin(annotation) is list or (
            typing.get_origin(annotation) is tuple and typing.get_args(annotation)[1:] == (...,)):
        inner, _ = _unwrap(typing.get_args(annotation)[0])
        return inner, True
    return annotation, False


def _default(field) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel],
                         skip: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag, default = "--" + name.replace("_", "-"), _default(field)
        kind, is_list = _unwrap(field.annotation)
        text = f"{field.description or name} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
            continue
        options: dict[str, Any] = {"default": default, "help": text, "dest": name}
        if typing.get_origin(kind) is Literal:
            options["choices"] = list(typing.get_args(kind))
        else:
            options["type"] = kind if kind in (int, float) else str
        if is_list:
            options["nargs"] = "+" if any(getattr(m, "min_length", 0) for m in field.metadata) \
                else "*"
        parser.add_argument(flag, **options)


def config_from_args(args: argparse.Namespace, model: type[BaseModel]):
    values = {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
    return model.build(**values)
