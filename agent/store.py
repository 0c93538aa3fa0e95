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

__all__ = ["JournalEntry", "ModelRecord", "Slot", "Store"]

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
)


@dataclass(frozen=True)
class Slot:
    """One version of a model as the journal knows it: its verified manifest bytes and file."""

    version: str
    target: str | None = None
    sha256: str | None = None
    manifest_url: str = ""
    manifest: str | None = None  # the signed manifest JSON, re-verified before each load

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
