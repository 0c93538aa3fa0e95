"""The agent's SQLite store (WAL): desired state, per-model update journal, key-value facts.

Schema changes are numbered migrations keyed on ``PRAGMA user_version`` so later parts
(the outbox of issue "Agent offline") add tables without touching existing rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.messages import UpdateState, utcnow

__all__ = ["JournalEntry", "ModelRecord", "OutboxMessage", "OutboxStats", "Slot", "Store"]

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        desired_version TEXT,
        pending TEXT,
        active TEXT,
        previous TEXT,
        error TEXT,
        failed TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts TEXT NOT NULL,
        model TEXT NOT NULL,
        version TEXT,
        state TEXT NOT NULL,
        detail TEXT
    );
    """,
    # 2: the outbox (issue "Agent offline"). Telemetry and messages (reported state, command
    # results) have their own monotonic sequences: AUTOINCREMENT never reuses a number, so
    # (device, seq) identifies a point at the hub forever.
    """
    CREATE TABLE outbox_telemetry (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        payload TEXT NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE TABLE outbox_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        payload TEXT NOT NULL,
        retain INTEGER NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE TABLE executed_commands (id TEXT PRIMARY KEY, ts TEXT NOT NULL);
    """,
)


@dataclass(frozen=True)
class Slot:
    """One version of a model as the journal knows it: its verified manifest bytes and file."""

    version: str
    target: str | None = None
    sha256: str | None = None
    manifest_url: str = ""
    manifest: str | None = None  # the signed manifest JSON, re-verified before each load
    # The desired state's sha256 of those bytes: a resumed update checks it as the first run did.
    manifest_sha256: str | None = None

    def to_json(self) -> str:
        """Serialize for the store."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: str | None) -> Slot | None:
        """Parse a stored slot; None stays None."""
        return None if raw is None else cls(**json.loads(raw))


@dataclass(frozen=True)
class ModelRecord:
    """Where one model name stands: the update in progress, the active and previous version."""

    name: str
    state: UpdateState = UpdateState.IDLE
    desired_version: str | None = None
    pending: Slot | None = None
    active: Slot | None = None
    previous: Slot | None = None
    error: str | None = None
    failed: str | None = None  # "version@manifest_url" that failed fatally; not retried

    def with_(self, **changes: Any) -> ModelRecord:
        """Return a copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class JournalEntry:
    """One line of the update journal."""

    ts: str
    model: str
    version: str | None
    state: str
    detail: str | None


@dataclass(frozen=True)
class OutboxMessage:
    """One queued message (reported state or command result) waiting for its PUBACK."""

    seq: int
    channel: str
    payload: str
    retain: bool


@dataclass(frozen=True)
class OutboxStats:
    """How full the outbox is and what it had to drop."""

    telemetry_pending: int
    messages_pending: int
    bytes: int
    max_bytes: int
    dropped: int
    last_telemetry_seq: int
    refused: int = 0


class Store:
    """A thread-safe handle on the agent's SQLite file."""

    def __init__(self, path: Path | str) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self.outbox_max_bytes = 64 * 1024 * 1024
        self._outbox_bytes = self._sum_outbox_bytes()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[current:], start=current + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

    # key-value facts (desired state, applied revision, connection) ------------------------
    def get(self, key: str) -> str | None:
        """Return a stored value."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        """Store a value."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = ?", (key, value, value)
            )

    # models and their journal ------------------------------------------------------------------
    def model(self, name: str) -> ModelRecord:
        """Return the record of a model name (an idle one when unknown)."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return ModelRecord(name=name) if row is None else self._record(row)

    def models(self) -> list[ModelRecord]:
        """Return every model record, by name."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def save_model(self, record: ModelRecord, detail: str | None = None) -> ModelRecord:
        """Persist a record and append its state to the journal, in one transaction."""
        now = utcnow().isoformat()
        slot = record.pending or record.active
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO models(name, state, desired_version, pending, active, previous, error, failed,"
                " updated_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.state.value,
                    record.desired_version,
                    record.pending.to_json() if record.pending else None,
                    record.active.to_json() if record.active else None,
                    record.previous.to_json() if record.previous else None,
                    record.error,
                    record.failed,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO journal(ts, model, version, state, detail) VALUES(?, ?, ?, ?, ?)",
                (now, record.name, slot.version if slot else None, record.state.value, detail or record.error),
            )
        return record

    def delete_model(self, name: str) -> None:
        """Forget a model name (it left the desired state)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (name,))
            conn.execute(
                "INSERT INTO journal(ts, model, version, state, detail) VALUES(?, ?, NULL, 'idle', 'removed')",
                (utcnow().isoformat(), name),
            )

    def journal(self, model: str | None = None, limit: int = 100) -> list[JournalEntry]:
        """Return the latest journal lines, oldest first."""
        sql = "SELECT ts, model, version, state, detail FROM journal"
        args: tuple[Any, ...] = ()
        if model is not None:
            sql += " WHERE model = ?"
            args = (model,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [JournalEntry(*row) for row in reversed(rows)]

    @staticmethod
    def _record(row: tuple[Any, ...]) -> ModelRecord:
        name, state, desired, pending, active, previous, error, failed, _ = row
        return ModelRecord(
            name=name,
            state=UpdateState(state),
            desired_version=desired,
            pending=Slot.from_json(pending),
            active=Slot.from_json(active),
            previous=Slot.from_json(previous),
            error=error,
            failed=failed,
        )

    # the outbox ------------------------------------------------------------------------------
    def _sum_outbox_bytes(self) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT (SELECT COALESCE(SUM(size), 0) FROM outbox_telemetry)"
                " + (SELECT COALESCE(SUM(size), 0) FROM outbox_messages)"
            ).fetchone()
        return int(row[0])

    def enqueue_telemetry(self, points: list[tuple[str, str, float, dict[str, str]]]) -> list[int]:
        """Queue (ts, name, value, labels) points; return their sequence numbers.

        Past `outbox_max_bytes` the oldest telemetry is dropped (and counted) first;
        queued messages are never dropped.
        """
        if not points:
            return []
        rows = [
            json.dumps({"ts": ts, "name": name, "value": value, "labels": labels}) for ts, name, value, labels in points
        ]
        seqs: list[int] = []
        with self._tx() as conn:
            for payload in rows:
                cursor = conn.execute(
                    "INSERT INTO outbox_telemetry(payload, size) VALUES(?, ?)", (payload, len(payload))
                )
                seqs.append(int(cursor.lastrowid or 0))
            self._outbox_bytes += sum(len(p) for p in rows)
            self._enforce_bound(conn)
        return seqs

    def _enforce_bound(self, conn: sqlite3.Connection) -> None:
        over = self._outbox_bytes - self.outbox_max_bytes
        if over <= 0:
            return
        dropped, freed, last = 0, 0, 0
        for seq, size in conn.execute("SELECT seq, size FROM outbox_telemetry ORDER BY seq"):
            if freed >= over:
                break
            dropped, freed, last = dropped + 1, freed + int(size), int(seq)
        if dropped:
            conn.execute("DELETE FROM outbox_telemetry WHERE seq <= ?", (last,))
            conn.execute(
                "INSERT INTO kv(key, value) VALUES('outbox_dropped', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                (str(dropped), dropped),
            )
            self._outbox_bytes -= freed

    def enqueue_message(self, channel: str, payload: str, retain: bool = False, replace: bool = False) -> int:
        """Queue a message; `replace` drops unsent older ones of the channel (a newer state supersedes them)."""
        with self._tx() as conn:
            if replace:
                row = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox_messages WHERE channel = ?", (channel,)
                ).fetchone()
                conn.execute("DELETE FROM outbox_messages WHERE channel = ?", (channel,))
                self._outbox_bytes -= int(row[1])
            cursor = conn.execute(
                "INSERT INTO outbox_messages(channel, payload, retain, size) VALUES(?, ?, ?, ?)",
                (channel, payload, int(retain), len(payload)),
            )
            self._outbox_bytes += len(payload)
            self._enforce_bound(conn)
        return int(cursor.lastrowid or 0)

    def next_messages(self, limit: int = 100) -> list[OutboxMessage]:
        """Return the oldest queued messages, in sequence order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, channel, payload, retain FROM outbox_messages ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxMessage(int(r[0]), str(r[1]), str(r[2]), bool(r[3])) for r in rows]

    def next_telemetry(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Return the oldest queued points as (seq, point fields), in sequence order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, payload FROM outbox_telemetry ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), json.loads(payload)) for seq, payload in rows]

    def ack_messages(self, seqs: list[int]) -> None:
        """Delete messages the broker acknowledged."""
        self._ack("outbox_messages", seqs)

    def ack_telemetry(self, seqs: list[int]) -> None:
        """Delete points the broker acknowledged."""
        self._ack("outbox_telemetry", seqs)

    def _ack(self, table: str, seqs: list[int]) -> None:
        if not seqs:
            return
        marks = ",".join("?" * len(seqs))
        with self._tx() as conn:
            size = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM {table} WHERE seq IN ({marks})", seqs).fetchone()
            conn.execute(f"DELETE FROM {table} WHERE seq IN ({marks})", seqs)
            self._outbox_bytes -= int(size[0])

    def count_refused(self) -> None:
        """Count one delivery the broker refused (the rows stay queued)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO kv(key, value) VALUES('outbox_refused', '1')"
                " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )

    def outbox_stats(self) -> OutboxStats:
        """Return the outbox's size, bound, drop count and last telemetry sequence number."""
        with self._lock:
            telemetry = self._conn.execute("SELECT COUNT(*) FROM outbox_telemetry").fetchone()[0]
            messages = self._conn.execute("SELECT COUNT(*) FROM outbox_messages").fetchone()[0]
            last = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox_telemetry'").fetchone()
        return OutboxStats(
            telemetry_pending=int(telemetry),
            messages_pending=int(messages),
            bytes=self._outbox_bytes,
            max_bytes=self.outbox_max_bytes,
            dropped=int(self.get("outbox_dropped") or 0),
            last_telemetry_seq=int(last[0]) if last else 0,
            refused=int(self.get("outbox_refused") or 0),
        )

    # commands already executed (a command delivered twice runs once) ----------------------------
    def claim_command(self, command_id: str) -> bool:
        """Record a command id; return False when it was already executed."""
        with self._tx() as conn:
            try:
                conn.execute("INSERT INTO executed_commands(id, ts) VALUES(?, ?)", (command_id, utcnow().isoformat()))
            except sqlite3.IntegrityError:
                return False
            # Keep the table small: ids older than the newest 10,000 are forgotten.
            conn.execute(
                "DELETE FROM executed_commands WHERE rowid <= (SELECT MAX(rowid) FROM executed_commands) - 10000"
            )
        return True
