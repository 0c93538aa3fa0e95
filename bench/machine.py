"""The machine a bench runs on: the CPU flags its figures depend on (benches print them beside their ratios)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_flag_set"]


def cpu_flag_set() -> set[str]:
    """Return every flag of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return set()
