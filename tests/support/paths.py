"""Where things are in the repository, for tests that read its files."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLES", "K3S", "OVERLAYS", "ROOT"]

ROOT = Path(__file__).resolve().parents[2]
K3S = ROOT / "k3s"
OVERLAYS = ("k3s", "kubeedge", "gpu")
EXAMPLES = ROOT / "examples"
