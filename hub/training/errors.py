"""Errors raised by training.

Errors::

    TrainingError               anything that stops a training task
    ├── SpecError               the task file is malformed or inconsistent (names the field)
    ├── DataError               the data cannot be loaded or cannot train a model
    └── TrainingCancelled       the cancel event was set
"""

from __future__ import annotations

__all__ = ["DataError", "SpecError", "TrainingCancelled", "TrainingError"]


class TrainingError(Exception):
    """Anything that stops a training task."""


class SpecError(TrainingError):
    """The task file is malformed or inconsistent; the message names the field."""


class DataError(TrainingError):
    """The data cannot be loaded or cannot train a model; the message names the field."""


class TrainingCancelled(TrainingError):
    """Training stopped because its cancel event was set."""
