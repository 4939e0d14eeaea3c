"""Base class of every stage config: frozen, no unknown fields, validated at construction."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from gprune.errors import ConfigError


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def params(self) -> dict[str, Any]:
        """The parameters that enter the artifact key (JSON-serializable)."""
        return self.model_dump(mode="json")

    @classmethod
    def build(cls, **values: Any) -> "StageConfig":
        """Construct, turning a pydantic error into a one-line ConfigError."""
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{cls.__name__}: {where + ': ' if where else ''}{message}") from err
