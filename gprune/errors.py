"""User-facing errors. The CLI prints them as one line and exits non-zero."""


class GpruneError(Exception):
    """An error caused by input the user can fix; the message says how."""


class ConfigError(GpruneError, ValueError):
    """An invalid stage or flow configuration."""


class ArtifactError(GpruneError):
    """A missing, partial, corrupted or mismatched artifact."""


class AssetError(GpruneError):
    """A model or corpus that cannot be found or fetched."""


class CorruptArtifactError(ArtifactError):
    """A stored artifact whose manifest or files do not match what was written."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"artifact {key} is corrupt: {problem}; rerun its stage to move it to "
                         f"quarantine and rebuild it (or: gprune verify --quarantine {key})")
        self.key = key
        self.problem = problem

    def __reduce__(self):  # picklable across processes (Dask workers)
        return type(self), (self.key, self.problem)
