"""Write what devices report into the database: state, presence, command results, telemetry.

Every function takes an open session and leaves committing to the caller, so the MQTT
writer thread (`hub.messaging.session`) decides what goes into one transaction. Telemetry is
inserted with ``ON CONFLICT (device_id, seq) DO NOTHING`` (SQLite and PostgreSQL), so
a batch delivered twice lands once.

Errors::

    IngestRejected(reason)     a well-formed message the hub will not store (unknown device...)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Table, Text, bindparam, cast, func, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql
from sqlmodel import Session, col, select

from hub.models import Command, CommandStatus, Device, TelemetryPoint, utcnow
from shared.messages import CommandResult, DesiredState, Presence, ReportedState, TelemetryBatch

__all__ = [
    "REJECT_REASONS",
    "CounterSnapshot",
    "IngestRejected",
    "MessageCounters",
    "active_devices",
    "apply_presence",
    "apply_reported",
    "apply_result",
    "insert_telemetry",
    "mark_stale_offline",
    "telemetry_rows",
]

logger = logging.getLogger(__name__)

# Reasons besides shared.codec.REASONS (too_large, malformed, schema_version, unknown_kind,
# wrong_kind, invalid) under which an inbound message is counted and dropped.
REJECT_REASONS = (
    "bad_topic",  # not a device-to-hub topic of the protocol
    "device_mismatch",  # the payload's device_id is not the topic's device
    "unknown_device",  # never enrolled, or decommissioned
    "unknown_command",  # a result for a command the hub never sent
    "db_error",  # the database refused it
    "internal",  # a bug: logged with its traceback
)


class IngestRejected(Exception):
    """A message that decoded fine but will not be stored; `reason` names why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CounterSnapshot:
    """The ingest counters at one moment."""

    ingested: Mapping[str, int] = field(default_factory=dict)  # by message kind
    rejected: Mapping[str, int] = field(default_factory=dict)  # by reason
    points_written: int = 0
    points_duplicate: int = 0
    devices_marked_offline: int = 0

    @property
    def total_rejected(self) -> int:
        """Return the number of rejected messages, all reasons together."""
        return sum(self.rejected.values())


class MessageCounters:
    """Thread-safe counts of ingested and rejected messages (read by /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ingested: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._written = 0
        self._duplicate = 0
        self._offline = 0

    def ingested(self, kind: str, n: int = 1) -> None:
        """Count `n` stored messages of `kind`."""
        with self._lock:
            self._ingested[kind] += n

    def rejected(self, reason: str, n: int = 1) -> None:
        """Count `n` dropped messages for `reason`."""
        with self._lock:
            self._rejected[reason] += n

    def points(self, written: int, duplicate: int) -> None:
        """Count telemetry points inserted and points that were there already."""
        with self._lock:
            self._written += written
            self._duplicate += duplicate

    def offline(self, n: int) -> None:
        """Count devices the heartbeat sweep marked offline."""
        with self._lock:
            self._offline += n

    def snapshot(self) -> CounterSnapshot:
        """Return a consistent copy of every counter."""
        with self._lock:
            return CounterSnapshot(
                dict(self._ingested), dict(self._rejected), self._written, self._duplicate, self._offline
            )


def active_devices(session: Session, device_ids: Iterable[str]) -> set[str]:
    """Return which of `device_ids` are enrolled and not decommissioned."""
    ids = sorted(set(device_ids))
    if not ids:
        return set()
    query = select(Device.id).where(col(Device.id).in_(ids), col(Device.decommissioned).is_(False))
    return set(session.exec(query))


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None or device.decommissioned:
        raise IngestRejected("unknown_device", f"no active device {device_id!r}")
    return device


def apply_reported(
    session: Session, msg: ReportedState, *, live: bool, now: datetime | None = None
) -> DesiredState | None:
    """Store a device's reported state; a live (not retained) one also counts as a heartbeat.

    A device that applied a higher revision than the stored desired state saw one this
    database no longer knows (restored from a backup). A device ignores a revision older
    than one it saw, so the stored state is renumbered past the device's and returned, for
    the caller to publish after the commit.
    """
    device = _device(session, msg.device_id)
    device.reported = msg.model_dump(mode="json")
    if msg.profile is not None:
        device.profile = msg.profile.model_dump(mode="json")
    if msg.agent_version:
        device.agent_version = msg.agent_version
    if live:
        device.online, device.last_seen = True, now or utcnow()
    renumbered = None
    if device.desired and msg.revision > (desired := DesiredState.model_validate(device.desired)).revision:
        renumbered = desired.model_copy(update={"revision": msg.revision + 1})
        device.desired = renumbered.model_dump(mode="json")
        logger.warning(
            "%s applied desired revision %d, past the stored %d; its desired state is renumbered %d",
            msg.device_id,
            msg.revision,
            desired.revision,
            renumbered.revision,
        )
    session.add(device)
    return renumbered


def apply_presence(session: Session, msg: Presence, *, live: bool, now: datetime | None = None) -> None:
    """Store a device's presence.

    A retained "online" replayed at subscribe time says nothing about now, so only a
    live message marks a device online; "offline" is believed either way.
    """
    device = _device(session, msg.device_id)
    if msg.agent_version:
        device.agent_version = msg.agent_version
    if live:
        device.online, device.last_seen = msg.online, now or utcnow()
    elif not msg.online:
        device.online = False
    session.add(device)


def apply_result(session: Session, msg: CommandResult, *, now: datetime | None = None) -> None:
    """Record a command's result on its row (a repeated result changes nothing)."""
    device = _device(session, msg.device_id)
    row = session.get(Command, msg.id)
    if row is None:
        raise IngestRejected("unknown_command", f"no command {msg.id!r}")
    if row.device_id != msg.device_id:
        raise IngestRejected("device_mismatch", f"command {msg.id} belongs to {row.device_id}, not {msg.device_id}")
    # Checked before any change: the writer stores many messages in one transaction.
    device.online, device.last_seen = True, now or utcnow()
    session.add(device)
    if row.status in (CommandStatus.SUCCEEDED.value, CommandStatus.FAILED.value):
        return
    row.status = (CommandStatus.SUCCEEDED if msg.ok else CommandStatus.FAILED).value
    row.result = msg.output
    row.error = msg.error
    row.finished_at = msg.finished_at
    session.add(row)


def telemetry_rows(batch: TelemetryBatch) -> list[dict[str, Any]]:
    """Return the telemetry_point rows of a batch."""
    return [
        {"device_id": batch.device_id, "seq": p.seq, "ts": p.ts, "name": p.name, "value": p.value, "labels": p.labels}
        for p in batch.points
    ]


def insert_telemetry(session: Session, rows: Sequence[dict[str, Any]], *, now: datetime | None = None) -> int:
    """Insert points, skipping (device_id, seq) pairs stored already; return how many were new.

    Also marks the points' devices online and seen now. Rows must belong to active devices
    (see `active_devices`).
    """
    unique = list({(r["device_id"], r["seq"]): r for r in rows}.values())
    if not unique:
        return 0
    table: Table = TelemetryPoint.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect.name
    stmt: Any = None
    inserted = 0
    if dialect == "postgresql":
        stmt = _pg_insert_from_arrays(table, unique)
    elif dialect == "sqlite":
        inserted = _sqlite_insert(session, unique)
    else:
        raise NotImplementedError(f"telemetry ingest supports SQLite and PostgreSQL, not {dialect}")
    if stmt is not None:
        # RETURNING counts the new rows (rowcount is not reliable for this statement).
        stmt = stmt.on_conflict_do_nothing(index_elements=["device_id", "seq"]).returning(table.c.seq)
        inserted = len(session.execute(stmt).all())
    devices = sorted({r["device_id"] for r in unique})
    session.execute(update(Device).where(col(Device.id).in_(devices)).values(online=True, last_seen=now or utcnow()))
    return inserted


_SQLITE_INSERT = "INSERT INTO telemetry_point (device_id, seq, ts, name, value, labels) VALUES "
_SQLITE_ON_CONFLICT = " ON CONFLICT (device_id, seq) DO NOTHING"
_SQLITE_ROWS_PER_STATEMENT = 500


@lru_cache(maxsize=8)
def _sqlite_statement(rows: int) -> str:
    """Return the insert of `rows` rows in one VALUES list."""
    return _SQLITE_INSERT + ",".join(["(?, ?, ?, ?, ?, ?)"] * rows) + _SQLITE_ON_CONFLICT


def _sqlite_ts(ts: datetime | str) -> str:
    """Return `ts` as SQLAlchemy stores a DateTime in SQLite (UTC, no offset); a str is that already."""
    if isinstance(ts, str):
        return ts
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(" ", "microseconds")


def _labels_json(labels: dict[str, str], cache: dict[tuple[tuple[str, str], ...], str]) -> str:
    """Return `labels` as JSON; most points of a batch share their labels, so memoize per call."""
    if not labels:
        return "{}"
    key = tuple(labels.items())
    text = cache.get(key)
    if text is None:
        text = cache[key] = json.dumps(labels)
    return text


def _sqlite_insert(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert with a few multi-row VALUES statements of plain values; return how many rows were new.

    SQLAlchemy's insertmanyvalues path (with RETURNING) costs several times the insert
    itself. The driver's ``executemany`` does not, but it steps SQLite once per row, and
    every step releases and takes back the GIL: with paho's network thread busy
    receiving, those hand-overs cost the writer a third of its CPU (bench/fleet.py at
    5,000 devices). One statement per few hundred rows steps SQLite (and releases the
    GIL) once for all of them.
    ``total_changes`` counts what DO NOTHING skipped out.
    """
    driver = session.connection().connection.driver_connection
    assert driver is not None
    cache: dict[tuple[tuple[str, str], ...], str] = {}
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 6
    per_statement = max(1, min(_SQLITE_ROWS_PER_STATEMENT, limit))
    before = driver.total_changes
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        params = [
            value
            for r in chunk
            for value in (
                r["device_id"],
                r["seq"],
                _sqlite_ts(r["ts"]),
                r["name"],
                r["value"],
                _labels_json(r["labels"], cache),
            )
        ]
        driver.execute(_sqlite_statement(len(chunk)), params)
    changed: int = driver.total_changes - before
    return changed


def _aware(ts: datetime | str) -> datetime:
    """Return a row's time as an aware datetime (fast-path rows carry SQLite's UTC string)."""
    if isinstance(ts, str):
        return datetime.fromisoformat(ts).replace(tzinfo=UTC)
    return ts


def _pg_insert_from_arrays(table: Table, rows: Sequence[dict[str, Any]]) -> Any:
    """Return ``INSERT ... SELECT FROM unnest(arrays)``: six array parameters instead of six per row.

    psycopg parses a multi-row VALUES statement's thousands of placeholders on the client,
    which costs more than the insert itself.
    """
    arrays: dict[str, tuple[Any, list[Any]]] = {
        "device_id": (Text(), [r["device_id"] for r in rows]),
        "seq": (BigInteger(), [r["seq"] for r in rows]),
        "ts": (DateTime(timezone=True), [_aware(r["ts"]) for r in rows]),
        "name": (Text(), [r["name"] for r in rows]),
        "value": (Float(), [r["value"] for r in rows]),
        "labels": (Text(), [json.dumps(r["labels"]) for r in rows]),
    }
    params: list[Any] = [
        bindparam(f"tp_{name}", value, type_=postgresql.ARRAY(kind)) for name, (kind, value) in arrays.items()
    ]
    source = func.unnest(*params).table_valued(*arrays).render_derived(name="points")
    columns: list[Any] = [source.c[name] for name in arrays]
    columns[-1] = cast(source.c.labels, JSON)
    return postgresql.insert(table).from_select(list(arrays), sa_select(*columns))


def mark_stale_offline(session: Session, timeout_s: float, *, now: datetime | None = None) -> list[str]:
    """Mark online devices not heard from for `timeout_s` offline; return their ids."""
    cutoff = (now or utcnow()) - timedelta(seconds=timeout_s)
    stale = or_(col(Device.last_seen).is_(None), col(Device.last_seen) < cutoff)
    ids = list(session.exec(select(Device.id).where(col(Device.online).is_(True), stale)))
    if ids:
        session.execute(
            update(Device).where(col(Device.id).in_(ids), col(Device.online).is_(True), stale).values(online=False)
        )
    return ids
