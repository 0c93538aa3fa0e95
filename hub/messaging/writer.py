"""The one thread that writes device messages into the database.

`hub.messaging.session` validates messages on paho's network thread and hands them over as
`Inbound` items; `IngestWriter` applies state, presence and command results as they come
(those queued together in one transaction: 5,000 devices reporting at once are not 5,000
commits), buffers telemetry and writes it in batches (on `batch_size` points or after `flush_s`),
then acknowledges each MQTT message through `ack` (so one the hub crashed on comes again),
and marks devices offline that missed their heartbeat window. A database outage is
retried a few times; a message that still cannot be stored is counted as ``db_error``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from hub.messaging import ingest
from hub.messaging.decode import TelemetryRows
from hub.messaging.ingest import IngestRejected, MessageCounters
from shared.messages import CommandResult, DesiredState, Presence, ReportedState, TelemetryBatch

__all__ = ["Inbound", "IngestWriter"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()
_RESYNC = object()


@dataclass(frozen=True)
class Inbound:
    """A validated device message waiting for the writer thread."""

    message: ReportedState | CommandResult | TelemetryBatch | TelemetryRows | Presence
    live: bool  # False for a retained message replayed at subscribe time
    mid: int
    qos: int
    received_at: datetime


_Telemetry = TelemetryRows | TelemetryBatch


def _count(message: _Telemetry) -> int:
    return message.count if isinstance(message, TelemetryRows) else len(message.points)


def _marks_offline(item: Inbound) -> bool:
    """Return True for a presence message saying the device went offline."""
    return isinstance(item.message, Presence) and not item.message.online


def _store(session: Session, item: Inbound) -> DesiredState | None:
    """Apply a state, presence or command result in `session` (raises IngestRejected before any change).

    Return a desired state to publish once committed (see `ingest.apply_reported`).
    """
    message = item.message
    if isinstance(message, ReportedState):
        return ingest.apply_reported(session, message, live=item.live, now=item.received_at)
    if isinstance(message, Presence):
        ingest.apply_presence(session, message, live=item.live, now=item.received_at)
    elif isinstance(message, CommandResult):
        ingest.apply_result(session, message, now=item.received_at)
    return None


def _rows(message: _Telemetry) -> list[dict[str, Any]]:
    return message.rows if isinstance(message, TelemetryRows) else ingest.telemetry_rows(message)


class IngestWriter:
    """Owns the database side of ingest; everything runs on its own thread."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        counters: MessageCounters,
        *,
        ack: Callable[[int, int], None],
        on_resync: Callable[[], None],
        on_desired: Callable[[DesiredState], object] = lambda state: None,
        batch_size: int,
        flush_s: float,
        heartbeat_timeout_s: float,
        sweep_interval_s: float,
        queue_size: int = 10000,
        group_size: int = 500,
    ) -> None:
        self._sessions = session_factory
        self.counters = counters
        self._ack = ack
        self._on_resync = on_resync
        self._on_desired = on_desired
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.group_size = group_size  # queued messages taken and stored together at most
        self.queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._loop, name="mqtt-ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store and acknowledge everything queued, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self.queue.put(_STOP)
            thread.join(timeout)

    def put(self, item: Inbound, timeout: float) -> None:
        """Queue a message; raise queue.Full after `timeout` seconds."""
        self.queue.put(item, timeout=timeout)

    def request_resync(self) -> None:
        """Ask the thread to run `on_resync` (after a (re)connect)."""
        self.queue.put(_RESYNC)

    def _loop(self) -> None:
        pending: list[Inbound] = []  # telemetry waiting for its batch
        points = 0
        oldest = 0.0
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            deadline = min(next_sweep, oldest + self.flush_s if pending else math.inf)
            try:
                items = [self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))]
            except queue.Empty:
                items = []
            items += self._take(self.group_size - len(items))
            # States, presence and results that came together are stored in one transaction.
            run: list[Inbound] = []
            try:
                for index, item in enumerate(items):
                    if item is _STOP:
                        self._apply_all(run)
                        self._drain(pending, items[index + 1 :])
                        self._flush(pending)
                        return
                    if item is _RESYNC:
                        self._apply_all(run)
                        run = []
                        self._on_resync()
                    elif isinstance(item, Inbound):
                        if isinstance(item.message, TelemetryRows | TelemetryBatch):
                            if not pending:
                                oldest = time.monotonic()
                            pending.append(item)
                            points += _count(item.message)
                        else:
                            if pending and _marks_offline(item):
                                # Keep arrival order: points sent before "offline" must not flip it back.
                                self._apply_all(run)
                                run = []
                                self._flush(pending)
                                pending, points = [], 0
                            run.append(item)
                self._apply_all(run)
                run = []
                if pending and (points >= self.batch_size or time.monotonic() - oldest >= self.flush_s):
                    self._flush(pending)
                    pending, points = [], 0
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self.sweep_interval_s
            except Exception:  # the writer must outlive any one bad batch
                # Unacknowledged messages come again after the next reconnect.
                logger.exception("ingest writer error")
                self.counters.rejected("internal", max(len(pending) + len(run), 1))
                pending, points = [], 0

    def _take(self, n: int) -> list[object]:
        """Return up to `n` more queued items without waiting."""
        items: list[object] = []
        while len(items) < n:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _drain(self, pending: list[Inbound], taken: list[object]) -> None:
        """Store what was taken after the stop request, then whatever is still queued."""
        items = iter(taken)
        while True:
            item = next(items, None)
            if item is None:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    return
            if isinstance(item, Inbound):
                if isinstance(item.message, TelemetryRows | TelemetryBatch):
                    pending.append(item)
                else:
                    if pending and _marks_offline(item):
                        self._flush(pending)
                        pending.clear()
                    self._apply(item)

    def transact(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one transaction; retry a lost database connection before giving up."""
        for attempt in range(3):
            with self._sessions() as session:
                try:
                    result = work(session)
                    session.commit()
                    return result
                except OperationalError as exc:
                    session.rollback()
                    if attempt == 2:
                        raise
                    logger.warning("database unavailable (%s); retrying", exc.__class__.__name__)
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _reject(self, reason: str, kind: str, detail: str) -> None:
        self.counters.rejected(reason)
        logger.warning("dropped %s message: %s: %s", kind, reason, detail[:300])

    def _apply(self, item: Inbound) -> None:
        message = item.message
        try:
            desired = self.transact(lambda session: _store(session, item))
        except IngestRejected as exc:
            self._reject(exc.reason, message.kind, exc.detail)
        except Exception:
            logger.exception("could not store %s of %s", message.kind, message.device_id)
            self.counters.rejected("db_error")
        else:
            self.counters.ingested(message.kind)
            if desired is not None:
                self._on_desired(desired)
        self._ack(item.mid, item.qos)

    def _apply_all(self, items: list[Inbound]) -> None:
        """Store states, presence and results in one transaction, then acknowledge each.

        A message the hub refuses (IngestRejected) changes nothing before it is raised, so
        it is counted and the others are committed. If the transaction fails, each is
        stored on its own, so one bad message cannot take the others down.
        """
        if len(items) <= 1:
            for item in items:
                self._apply(item)
            return
        outcomes: list[IngestRejected | None] = []
        renumbered: list[DesiredState] = []

        def work(session: Session) -> None:
            outcomes.clear()  # a retried transaction starts over
            renumbered.clear()
            for item in items:
                try:
                    desired = _store(session, item)
                except IngestRejected as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
                    if desired is not None:
                        renumbered.append(desired)

        try:
            self.transact(work)
        except OperationalError:
            # The database stayed unavailable through the retries: as each alone would have.
            logger.exception("could not store %d device messages", len(items))
            self.counters.rejected("db_error", len(items))
            for item in items:
                self._ack(item.mid, item.qos)
            return
        except Exception:
            logger.warning("could not store %d device messages together; storing them one by one", len(items))
            for item in items:
                self._apply(item)
            return
        for desired in renumbered:
            self._on_desired(desired)
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is None:
                self.counters.ingested(item.message.kind)
            else:
                self._reject(outcome.reason, item.message.kind, outcome.detail)
            self._ack(item.mid, item.qos)

    def _flush(self, pending: list[Inbound]) -> None:
        if not pending:
            return
        batches = [i.message for i in pending if isinstance(i.message, TelemetryRows | TelemetryBatch)]
        seen = max(i.received_at for i in pending)

        def work(session: Session) -> tuple[list[_Telemetry], list[_Telemetry], int, int]:
            known = ingest.active_devices(session, (b.device_id for b in batches))
            accepted = [b for b in batches if b.device_id in known]
            rows = [row for b in accepted for row in _rows(b)]
            written = ingest.insert_telemetry(session, rows, now=seen)
            return accepted, [b for b in batches if b.device_id not in known], len(rows), written

        try:
            accepted, rejected, total, written = self.transact(work)
        except Exception:
            logger.exception("could not store %d telemetry batches", len(pending))
            self.counters.rejected("db_error", len(pending))
        else:
            self.counters.points(written, total - written)
            self.counters.ingested("telemetry", len(accepted))
            for batch in rejected:
                self._reject("unknown_device", "telemetry", f"no active device {batch.device_id!r}")
        for item in pending:
            self._ack(item.mid, item.qos)

    def _sweep(self) -> None:
        gone = self.transact(lambda session: ingest.mark_stale_offline(session, self.heartbeat_timeout_s))
        if gone:
            self.counters.offline(len(gone))
            logger.info(
                "no heartbeat for %.0fs: %d devices offline (%s)", self.heartbeat_timeout_s, len(gone), gone[:5]
            )
