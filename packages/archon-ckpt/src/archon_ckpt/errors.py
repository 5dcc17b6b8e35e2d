"""The one exception type of checkpoint loading (imported by the checkpointer and its validators alike)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the state being loaded."""
