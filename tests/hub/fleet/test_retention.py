"""Telemetry retention: old and surplus raw points pruned by the periodic task, their hourly history kept."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session, func, select

from hub.fleet.retention import prune_telemetry
from hub.models import TelemetryPoint, TelemetryRollup
from tests.support.hub_app import make_hub
from tests.support.waiting import wait_for

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)


def _points(session: Session, device_id: str, start: datetime, values: list[float], seq0: int) -> None:
    for i, value in enumerate(values):
        session.add(
            TelemetryPoint(device_id=device_id, seq=seq0 + i, ts=start + timedelta(seconds=i), name="cpu", value=value)
        )
    session.commit()


def _count(session: Session) -> int:
    return int(session.exec(select(func.count()).select_from(TelemetryPoint)).one())


def _pruned(factory: Callable[[], Session]) -> bool:
    with factory() as session:
        return _count(session) == 2


def test_the_periodic_task_prunes_old_points_and_the_api_serves_their_hourly_history(tmp_path: Path) -> None:
    settings = {"telemetry_retention_s": 3600.0, "telemetry_prune_interval_s": 0.2}
    for hub in make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", **settings):
        device = hub.enrolled_device()["device_id"]
        factory = hub.client.app.state.session_factory  # type: ignore[attr-defined]
        with factory() as session:
            _points(session, device, NOW - timedelta(hours=3), [1.0, 2.0, 9.0], 0)  # one old hour
            _points(session, device, NOW - timedelta(hours=2), [4.0], 10)  # another
            _points(session, device, NOW - timedelta(minutes=5), [7.0, 8.0], 20)  # recent: kept raw
        # The app's lifespan (entered by make_hub) runs the retention task.
        wait_for("the old points pruned", functools.partial(_pruned, factory), 20)
        raw = hub.request("GET", "/telemetry", params={"device_id": device}).json()["points"]
        assert [p["value"] for p in raw] == [7.0, 8.0]
        history = hub.request("GET", "/telemetry/history", params={"device_id": device}).json()["buckets"]
        assert [(b["count"], b["mean"], b["min"], b["max"]) for b in history] == [
            (3, 4.0, 1.0, 9.0),
            (1, 4.0, 4.0, 4.0),
        ]


def test_points_past_the_size_limit_go_oldest_first_into_the_history(tmp_path: Path) -> None:
    for hub in make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}"):
        factory = hub.client.app.state.session_factory  # type: ignore[attr-defined]
        with factory() as session:
            _points(session, "dev-x", NOW - timedelta(minutes=50), [float(i) for i in range(25)], 0)
            result = prune_telemetry(session, max_age=timedelta(days=1), max_points=10, chunk=4)
            assert result.removed == 15 and _count(session) == 10
            kept = session.exec(select(TelemetryPoint.value).order_by(TelemetryPoint.seq)).all()
            assert list(kept) == [float(i) for i in range(15, 25)]
            (rollup,) = session.exec(select(TelemetryRollup)).all()
            assert (rollup.count, rollup.sum, rollup.min, rollup.max) == (15, float(sum(range(15))), 0.0, 14.0)
