"""Telemetry of a rollout's cohorts: requests, errors, p95 latency (and for text generation time to first
token and tokens/s) of one model version, or of any other."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session, col, select

from hub.models import TelemetryPoint
from hub.rollouts.analysis import CohortMetrics, aggregate_metrics
from hub.rollouts.queries import chunks
from hub.rollouts.spec import AnalysisCriteria
from shared.metrics import MODEL_LABEL, VERSION_LABEL

__all__ = ["cohort_metrics"]


def cohort_metrics(
    session: Session,
    criteria: AnalysisCriteria,
    model: str,
    devices: Sequence[str],
    since: datetime,
    version: str,
    on_version: bool,
) -> CohortMetrics:
    """Aggregate the model's telemetry of `devices` since `since`, on `version` or on any other."""
    names = [
        criteria.requests_metric,
        criteria.errors_metric,
        criteria.latency_metric,
        criteria.ttft_metric,
        criteria.decode_tps_metric,
    ]
    points: list[tuple[str, str, float]] = []
    for chunk in chunks(devices):
        query = select(TelemetryPoint).where(
            col(TelemetryPoint.device_id).in_(chunk),
            col(TelemetryPoint.name).in_(names),
            col(TelemetryPoint.ts) >= since,
        )
        for p in session.exec(query):
            labels = p.labels
            if labels.get(MODEL_LABEL) == model and (labels.get(VERSION_LABEL) == version) is on_version:
                points.append((p.device_id, p.name, p.value))
    return aggregate_metrics(points, criteria, devices=len(devices))
