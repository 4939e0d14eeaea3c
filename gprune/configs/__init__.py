"""One typed, validated config per stage (pydantic: usable directly as Prefect flow parameters)."""
from gprune.configs.base import StageConfig

__all__ = ["StageConfig"]
