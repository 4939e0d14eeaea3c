"""Artifact contracts and the content-addressed store."""
from artifacts.store import Artifact, ArtifactStore, artifact_key

__all__ = ["Artifact", "ArtifactStore", "artifact_key"]
