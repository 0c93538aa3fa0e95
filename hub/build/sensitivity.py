"""Find the nodes whose quantization hurts most, by measuring each one alone."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeSensitivity", "exclusion_steps", "rank_nodes"]

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 48


@dataclass(frozen=True)
class NodeSensitivity:
    """The error one node adds when it alone is quantized (1 - mean cosine to torch)."""

    node: str
    error: float


def rank_nodes(
    candidates: Sequence[str],
    quantize_only: Callable[[str], Path],
    error_of: Callable[[Path], float],
) -> list[NodeSensitivity]:
    """Quantize one node at a time, measure the output error, most damaging first."""
    ranked = []
    for node in list(candidates)[:MAX_CANDIDATES]:
        path = quantize_only(node)
        ranked.append(NodeSensitivity(node, error_of(path)))
        path.unlink(missing_ok=True)
    ranked.sort(key=lambda s: s.error, reverse=True)
    logger.info("most sensitive nodes: %s", [(s.node, round(s.error, 5)) for s in ranked[:5]])
    return ranked


def exclusion_steps(limit: int, available: int) -> list[int]:
    """Return how many top nodes to exclude on each retry: 1, 2, 4, ... up to `limit`."""
    steps, k = [], 1
    top = min(limit, available)
    while k < top:
        steps.append(k)
        k *= 2
    if top >= 1:
        steps.append(top)
    return steps
