"""A registry of named classes (importance criteria, allocators): register, look up, and a
pydantic type for parameters that name one."""
from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator

from gprune.errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> class; ``kind`` names what it holds in error messages."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: add ``cls`` under ``cls.name``."""
        if cls.name in self and self[cls.name] is not cls:
            raise ConfigError(f"{self.kind} {cls.name!r} is registered twice")
        self[cls.name] = cls
        return cls

    def unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; known: {', '.join(self)}"

    def lookup(self, name: str) -> type[T]:
        if name not in self:
            raise ConfigError(self.unknown(name))
        return self[name]

    def name_type(self):
        """``Annotated[str, ...]`` that accepts only registered names (pydantic fields)."""
        def known(name: str) -> str:
            if name not in self:
                raise ValueError(self.unknown(name))
            return name

        return Annotated[str, AfterValidator(known)]
