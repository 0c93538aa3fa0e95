"""The hub's fast telemetry decoder accepts and refuses exactly what the contract's decoder does."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlmodel import Session, select

from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.messaging import ingest
from hub.messaging.decode import decode_telemetry
from hub.models import Device, TelemetryPoint
from shared import codec
from shared.messages import TelemetryBatch
from shared.messages import TelemetryPoint as WirePoint


def _payload(**overrides: object) -> bytes:
    batch = {
        "schema_version": 1,
        "kind": "telemetry",
        "device_id": "dev-1",
        "points": [{"seq": 1, "ts": "2026-01-02T03:04:05.5Z", "name": "latency_ms", "value": 1.5, "labels": {}}],
    }
    batch.update(overrides)
    return json.dumps(batch).encode()


def test_fast_rows_match_the_contract_decoder() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    batch = TelemetryBatch(
        device_id="dev-1",
        points=[WirePoint(seq=i, ts=now, name="requests", value=float(i), labels={"model": "m"}) for i in range(3)],
    )
    rows = decode_telemetry(codec.encode(batch))
    assert rows.device_id == "dev-1" and rows.count == 3
    assert [(r["seq"], r["ts"], r["value"], r["labels"]) for r in rows.rows] == [
        (i, "2026-01-02 03:04:05.123456", float(i), {"model": "m"}) for i in range(3)
    ]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "malformed"),
        (b"[1]", "malformed"),
        (_payload(schema_version=2), "schema_version"),
        (_payload(kind="reported_state"), "wrong_kind"),
        (_payload(kind="nope"), "unknown_kind"),
        (_payload(points=[]), "invalid"),
        (
            _payload(points=[{"seq": -1, "ts": "2026-01-02T03:04:05Z", "name": "x", "value": 1, "labels": {}}]),
            "invalid",
        ),
        (_payload(points=[{"seq": 1, "ts": "2026-13-45T03:04:05Z", "name": "x", "value": 1, "labels": {}}]), "invalid"),
        (_payload(points=[{"seq": 1, "ts": "2026-01-02T03:04:05Z", "name": "", "value": 1, "labels": {}}]), "invalid"),
        (_payload(extra=1), "invalid"),
        (b"{" + b" " * 300_000 + b"}", "too_large"),
    ],
)
def test_bad_payloads_are_refused_with_the_contracts_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(codec.ProtocolError) as fast:
        decode_telemetry(payload)
    with pytest.raises(codec.ProtocolError) as contract:
        codec.decode(payload, TelemetryBatch)
    assert fast.value.reason == contract.value.reason == reason


def test_other_time_forms_are_stored_in_utc_and_duplicates_once(tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path)
    engine = create_engine_for(settings)
    migrate(engine)
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    points = [
        {"seq": 1, "ts": local.isoformat(), "name": "x", "value": 1.0, "labels": {"a": "b"}},
        {"seq": 2, "ts": "2026-01-02T03:04:06Z", "name": "x", "value": 2.0, "labels": {"a": "b"}},
    ]
    rows = decode_telemetry(_payload(points=points)).rows
    with Session(engine) as session:
        session.add(Device(id="dev-1"))
        session.commit()
        assert ingest.insert_telemetry(session, rows) == 2
        assert ingest.insert_telemetry(session, rows) == 0
        session.commit()
        stored = session.exec(select(TelemetryPoint).order_by(TelemetryPoint.seq)).all()
    assert [(p.ts.replace(tzinfo=None), p.labels) for p in stored] == [
        (datetime(2026, 1, 2, 3, 4, 5), {"a": "b"}),
        (datetime(2026, 1, 2, 3, 4, 6), {"a": "b"}),
    ]
    engine.dispose()


def test_more_points_than_one_sqlite_statement_holds_are_each_stored_once(tmp_path: Path) -> None:
    engine = create_engine_for(HubSettings(data_dir=tmp_path))
    migrate(engine)
    times = ["2026-01-02T03:04:05Z", "2026-01-02T03:04:05.25Z"]  # shared times are converted once
    points = [
        {"seq": i, "ts": times[i % 2], "name": "x", "value": float(i), "labels": {"n": str(i % 3)}} for i in range(1234)
    ]
    first = decode_telemetry(_payload(points=points[:700])).rows
    again = decode_telemetry(_payload(points=points)).rows  # 700 resent, 534 new
    with Session(engine) as session:
        session.add(Device(id="dev-1"))
        session.commit()
        assert ingest.insert_telemetry(session, first) == 700
        assert ingest.insert_telemetry(session, again) == 534
        session.commit()
        stored = session.exec(select(TelemetryPoint).order_by(TelemetryPoint.seq)).all()
    assert [p.seq for p in stored] == list(range(1234))
    assert [(p.ts.replace(tzinfo=None), p.value, p.labels) for p in stored[:2]] == [
        (datetime(2026, 1, 2, 3, 4, 5), 0.0, {"n": "0"}),
        (datetime(2026, 1, 2, 3, 4, 5, 250000), 1.0, {"n": "1"}),
    ]
    engine.dispose()
