"""Telemetry retention: raw points kept by age and count, their hourly history kept for good.

`prune_telemetry` takes the oldest raw points past `telemetry_retention_s`, or past
`telemetry_max_points` in all, in chunks of a few thousand: each chunk is folded into
`TelemetryRollup` rows (count, sum, min, max per device, metric and hour) and deleted in
the same transaction, so no point leaves without being counted in the history.
`RetentionTask` runs it every `telemetry_prune_interval_s` for the app's lifespan.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from hub.config import HubSettings
from hub.models import TelemetryPoint, TelemetryRollup, utcnow

__all__ = ["PruneResult", "RetentionTask", "install", "prune_telemetry"]

logger = logging.getLogger(__name__)

_CHUNK = 5000


@dataclass(frozen=True)
class PruneResult:
    """What one pass removed and folded into the hourly history."""

    removed: int = 0
    hours: int = 0


def _hour(ts: datetime) -> datetime:
    ts = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _fold(session: Session, points: list[TelemetryPoint]) -> int:
    """Add `points` to their hourly rollups; return how many rollup rows were touched."""
    groups: dict[tuple[str, str, datetime], list[float]] = {}
    for point in points:
        groups.setdefault((point.device_id, point.name, _hour(point.ts)), []).append(point.value)
    for (device_id, name, hour), values in groups.items():
        row = session.exec(
            select(TelemetryRollup).where(
                TelemetryRollup.device_id == device_id, TelemetryRollup.name == name, TelemetryRollup.hour == hour
            )
        ).first()
        if row is None:
            row = TelemetryRollup(
                device_id=device_id, name=name, hour=hour, count=0, sum=0.0, min=min(values), max=max(values)
            )
        row.count += len(values)
        row.sum += sum(values)
        row.min = min(row.min, *values)
        row.max = max(row.max, *values)
        session.add(row)
    return len(groups)


def prune_telemetry(
    session: Session, *, max_age: timedelta, max_points: int, now: datetime | None = None, chunk: int = _CHUNK
) -> PruneResult:
    """Fold and delete raw points older than `max_age`, then the oldest beyond `max_points`."""
    cutoff = (now or utcnow()) - max_age
    removed = hours = 0
    while True:
        old = list(
            session.exec(
                select(TelemetryPoint)
                .where(col(TelemetryPoint.ts) < cutoff)
                .order_by(col(TelemetryPoint.id))
                .limit(chunk)
            )
        )
        if not old:
            break
        removed, hours = removed + len(old), hours + _fold(session, old)
        session.execute(delete(TelemetryPoint).where(col(TelemetryPoint.id).in_([p.id for p in old])))
        session.commit()
    total = int(session.exec(select(func.count()).select_from(TelemetryPoint)).one())
    while total > max_points:
        oldest = list(
            session.exec(
                select(TelemetryPoint)
                .order_by(col(TelemetryPoint.ts), col(TelemetryPoint.id))
                .limit(min(chunk, total - max_points))
            )
        )
        if not oldest:
            break
        removed, hours = removed + len(oldest), hours + _fold(session, oldest)
        session.execute(delete(TelemetryPoint).where(col(TelemetryPoint.id).in_([p.id for p in oldest])))
        session.commit()
        total -= len(oldest)
    return PruneResult(removed, hours)


class RetentionTask:
    """A thread that prunes telemetry every `interval_s` until stopped."""

    def __init__(self, session_factory: Callable[[], Session], settings: HubSettings) -> None:
        self._sessions = session_factory
        self.settings = settings
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> PruneResult:
        """Prune now."""
        with self._sessions() as session:
            result = prune_telemetry(
                session,
                max_age=timedelta(seconds=self.settings.telemetry_retention_s),
                max_points=self.settings.telemetry_max_points,
            )
        self.passes += 1
        if result.removed:
            logger.info("telemetry retention: %d points folded into %d hourly rows", result.removed, result.hours)
        return result

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_prune_interval_s):
            try:
                self.run_once()
            except Exception:  # one failed pass (a locked database) must not end retention
                logger.exception("telemetry retention pass failed")

    def start(self) -> None:
        """Start the thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="telemetry-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def install(app: FastAPI, settings: HubSettings, session_factory: Callable[[], Session]) -> None:
    """Run a RetentionTask for the app's lifespan (``app.state.retention``)."""
    task = RetentionTask(session_factory, settings)
    app.state.retention = task
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[Any]:
        task.start()
        try:
            async with inner(app_) as state:
                yield state
        finally:
            task.stop()

    app.router.lifespan_context = lifespan
