"""Reading telemetry back: points by device, name and time range, optionally downsampled."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlmodel import Session, col, select

from hub.models import TelemetryPoint

__all__ = ["Bucket", "downsample", "query_points"]


@dataclass(frozen=True)
class Bucket:
    """Aggregate of the points of one name within one time step."""

    start: datetime
    name: str
    count: int
    mean: float
    min: float
    max: float


def query_points(
    session: Session,
    *,
    device_id: str | None = None,
    name: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 10_000,
) -> list[TelemetryPoint]:
    """Return points in time order, filtered by device, name and [start, end)."""
    query = select(TelemetryPoint).order_by(col(TelemetryPoint.ts), col(TelemetryPoint.id)).limit(limit)
    if device_id is not None:
        query = query.where(TelemetryPoint.device_id == device_id)
    if name is not None:
        query = query.where(TelemetryPoint.name == name)
    if start is not None:
        query = query.where(col(TelemetryPoint.ts) >= start)
    if end is not None:
        query = query.where(col(TelemetryPoint.ts) < end)
    return list(session.exec(query))


def downsample(points: list[TelemetryPoint], step_s: int) -> list[Bucket]:
    """Aggregate points into `step_s`-second buckets per name (count, mean, min, max)."""
    groups: dict[tuple[int, str], list[float]] = {}
    for point in points:
        ts = point.ts if point.ts.tzinfo else point.ts.replace(tzinfo=UTC)
        slot = int(ts.timestamp()) // step_s
        groups.setdefault((slot, point.name), []).append(point.value)
    return [
        Bucket(
            start=datetime.fromtimestamp(slot * step_s, UTC),
            name=name,
            count=len(values),
            mean=sum(values) / len(values),
            min=min(values),
            max=max(values),
        )
        for (slot, name), values in sorted(groups.items())
    ]
