"""The fault tests' model versions: good ones, broken ones, a big one.

Every version of model ``clf`` is a linear model of its own seed, so an agent's answer to
the manifest sample tells which bytes it really runs (`Fleet.assert_serves`).
``AUTODL_FAULT_RUNS`` sets how many randomized runs the repeated tests make (`make faults`: 20).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["BAD_SIGNATURE", "BIG", "CORRUPT", "GOOD", "MODEL", "TRUNCATED", "VERSIONS", "fault_runs"]

MODEL = "clf"
GOOD = {f"{i}.0.0": i for i in range(1, 7)}  # version -> seed
CORRUPT, TRUNCATED, BAD_SIGNATURE = "7.0.0", "7.1.0", "7.2.0"
BIG = "8.0.0"  # 12 MB of padding: the disk-full test fills its tmpfs while this downloads
VERSIONS: dict[str, dict[str, Any]] = {
    **{v: {"seed": s} for v, s in GOOD.items()},
    CORRUPT: {"seed": 7},
    TRUNCATED: {"seed": 8},
    BAD_SIGNATURE: {"seed": 9},
    BIG: {"seed": 10, "padding_bytes": 12 * 1024 * 1024},
}


def fault_runs(default: int = 2) -> int:
    """Return how many randomized runs a repeated fault test makes."""
    return int(os.environ.get("AUTODL_FAULT_RUNS", default))
