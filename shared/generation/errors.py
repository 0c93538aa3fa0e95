"""The loop's one error type."""

from __future__ import annotations

__all__ = ["GenerationError"]


class GenerationError(ValueError):
    """A model folder, graph or request that the generation loop cannot run."""
