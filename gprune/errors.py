"""User-facing errors. The CLI prints them as one line and exits non-zero."""


class GpruneError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(GpruneError, ValueError):
    """An invalid stage or flow configuration."""


class ArtifactError(GpruneError):
    """A missing, partial, corrupted or mismatched artifact."""


class AssetError(GpruneError):
    """A model or corpus that cannot be found or fetched."""
