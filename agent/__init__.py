"""The autodl edge agent: enrolls with a hub, converges to its desired state, serves inference.

It imports `shared` and never `hub`, torch, transformers or sqlmodel.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
