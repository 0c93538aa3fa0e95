"""Serving-telemetry names and labels shared by agents and the hub's rollout analysis."""

from __future__ import annotations

from shared import metrics


def test_serving_labels() -> None:
    assert metrics.serving_labels("clf", "1.2.0") == {metrics.MODEL_LABEL: "clf", metrics.VERSION_LABEL: "1.2.0"}
    assert metrics.serving_labels("clf", "1.2.0") == {"model": "clf", "version": "1.2.0"}


def test_names_are_distinct() -> None:
    assert len({metrics.REQUESTS, metrics.ERRORS, metrics.LATENCY_P95_MS}) == 3
