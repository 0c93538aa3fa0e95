"""Telemetry: points by device, name and time range, raw or downsampled."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from hub.api.deps import Viewer
from hub.api.schemas import ID_PATTERN, BucketPublic, TelemetryPointPublic, TelemetryResponse
from hub.db import SessionDep
from hub.fleet.telemetry import downsample, query_points

router = APIRouter(tags=["telemetry"])


@router.get("/telemetry")
def get_telemetry(
    session: SessionDep,
    _caller: Viewer,
    device_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    start: datetime | None = None,
    end: datetime | None = None,
    step_s: Annotated[int | None, Query(ge=1, le=30 * 86400, description="downsample into steps")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> TelemetryResponse:
    """Return points in time order, or per-step aggregates when `step_s` is given."""
    points = query_points(session, device_id=device_id, name=name, start=start, end=end, limit=limit)
    if step_s is not None:
        buckets = [BucketPublic.model_validate(b, from_attributes=True) for b in downsample(points, step_s)]
        return TelemetryResponse(buckets=buckets)
    return TelemetryResponse(points=[TelemetryPointPublic.model_validate(p, from_attributes=True) for p in points])
