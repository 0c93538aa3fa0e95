"""The ingest writer stores what came together in one transaction and acknowledges each message after its commit."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, func, select

from hub.config import HubSettings
from hub.db import create_engine_for, migrate, session_factory
from hub.messaging import ingest
from hub.messaging import writer as ingest_writer
from hub.messaging.decode import TelemetryRows
from hub.messaging.ingest import MessageCounters
from hub.messaging.writer import Inbound, IngestWriter
from hub.models import Device, TelemetryPoint
from shared.messages import Presence, ReportedState

DEVICES = [f"dev-{i:03d}" for i in range(40)]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A migrated SQLite database with the enrolled devices."""
    engine = create_engine_for(HubSettings(data_dir=tmp_path))
    migrate(engine)
    with Session(engine) as session:
        for device_id in DEVICES:
            session.add(Device(id=device_id))
        session.commit()
    yield engine
    engine.dispose()


def _stored(engine: Engine, item: Inbound) -> bool:
    """Return True when `item`'s effect is committed (read on a connection of its own)."""
    with Session(engine) as session:
        message = item.message
        if isinstance(message, TelemetryRows):
            query = (
                select(func.count()).select_from(TelemetryPoint).where(TelemetryPoint.device_id == message.device_id)
            )
            return int(session.exec(query).one()) == message.count
        device = session.get(Device, message.device_id)
        if isinstance(message, ReportedState):
            return device is not None and device.reported is not None
        return device is not None and device.online is (isinstance(message, Presence) and message.online)


def _run(
    engine: Engine,
    items: list[Inbound],
    after_stop: Sequence[Inbound] = (),
) -> tuple[MessageCounters, dict[int, bool]]:
    """Queue `items` before the writer starts (so it takes them together), stop it; return counters and acks.

    `after_stop` are queued behind the stop request, as paho's thread can while the hub stops.
    """
    counters = MessageCounters()
    acked: dict[int, bool] = {}  # mid -> was the message committed when it was acknowledged
    by_mid = {item.mid: item for item in [*items, *after_stop]}

    def ack(mid: int, _qos: int) -> None:
        acked[mid] = _stored(engine, by_mid[mid])

    writer = IngestWriter(
        session_factory(engine),
        counters,
        ack=ack,
        on_resync=lambda: None,
        batch_size=10_000,
        flush_s=60.0,
        heartbeat_timeout_s=3600.0,
        sweep_interval_s=3600.0,
    )
    for item in items:
        writer.put(item, timeout=1.0)
    if after_stop:
        writer.queue.put(ingest_writer._STOP)
        for item in after_stop:
            writer.put(item, timeout=1.0)
    writer.start()
    writer.stop()
    return counters, acked


def _inbound(mid: int, message: ReportedState | Presence | TelemetryRows) -> Inbound:
    return Inbound(message, True, mid, 1, datetime.now(UTC))


def _points(device_id: str, n: int) -> TelemetryRows:
    ts = "2026-01-02 03:04:05.000000"
    rows = [{"device_id": device_id, "seq": s, "ts": ts, "name": "x", "value": 1.0, "labels": {}} for s in range(n)]
    return TelemetryRows(device_id, rows)


def test_many_messages_share_a_transaction_and_each_is_acknowledged_after_its_commit(engine: Engine) -> None:
    items = [_inbound(i, ReportedState(device_id=d, revision=1)) for i, d in enumerate(DEVICES)]
    items.append(_inbound(100, ReportedState(device_id="dev-never-enrolled", revision=1)))
    items += [_inbound(200 + i, _points(d, 25)) for i, d in enumerate(DEVICES)]

    counters, acked = _run(engine, items)

    assert acked == {item.mid: item.mid != 100 for item in items}  # every message acked, each after its commit
    snap = counters.snapshot()
    assert snap.ingested == {"reported_state": len(DEVICES), "telemetry": len(DEVICES)}
    assert snap.rejected == {"unknown_device": 1}
    assert snap.points_written == 25 * len(DEVICES)


def test_a_failed_group_is_stored_one_by_one_and_loses_nothing_else(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ingest.apply_presence

    def flaky(session: Session, msg: Presence, **kwargs: object) -> None:
        if msg.device_id == DEVICES[3]:
            raise RuntimeError("a bug in one message")
        real(session, msg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest, "apply_presence", flaky)
    items = [_inbound(i, Presence(device_id=d, online=True)) for i, d in enumerate(DEVICES)]

    counters, acked = _run(engine, items)

    assert acked == {i: i != 3 for i in range(len(DEVICES))}
    snap = counters.snapshot()
    assert snap.ingested == {"presence": len(DEVICES) - 1}
    assert snap.rejected == {"db_error": 1}


def test_messages_queued_behind_the_stop_request_are_stored_and_acknowledged(engine: Engine) -> None:
    before = [_inbound(i, ReportedState(device_id=d, revision=1)) for i, d in enumerate(DEVICES[:10])]
    after = [_inbound(100 + i, ReportedState(device_id=d, revision=1)) for i, d in enumerate(DEVICES[10:20])]
    after += [_inbound(200 + i, _points(d, 5)) for i, d in enumerate(DEVICES[:10])]

    counters, acked = _run(engine, before, after)

    assert acked == {item.mid: True for item in [*before, *after]}
    assert counters.snapshot().ingested == {"reported_state": 20, "telemetry": 10}
