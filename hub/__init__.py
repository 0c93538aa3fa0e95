"""The autodl hub: trains, builds, registers, signs and rolls out models to a fleet.

It imports `shared` and never `agent`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
