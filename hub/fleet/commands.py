"""Commands: store one row per target device, publish it, and let results land on the row.

A command goes to one device or to every device matching a label selector. Rows are
committed before publishing, so a result can never arrive for an unknown command; the
MQTT ingest (`hub.messaging.session`) sets `status`, `result` and `finished_at` from the answer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, update
from sqlmodel import Session, col, select

from hub.audit import record
from hub.errors import ConflictError, InvalidInputError
from hub.fleet.devices import get_device, list_devices
from hub.models import Command, CommandStatus, utcnow
from shared.messages import Command as CommandMessage
from shared.messages import CommandName

__all__ = ["CommandPublisher", "expire_commands", "list_commands", "send_command", "to_message"]

logger = logging.getLogger(__name__)


class CommandPublisher(Protocol):
    """What sending needs of `hub.messaging.session.HubMessaging`."""

    def publish_command(self, cmd: CommandMessage) -> object: ...


def to_message(row: Command) -> CommandMessage:
    """Return the wire form of a stored command."""
    return CommandMessage(
        id=row.id,
        device_id=row.device_id,
        name=CommandName(row.name),
        args=dict(row.args),
        issued_at=row.created_at,
        expires_at=row.expires_at,
    )


def send_command(
    session: Session,
    name: CommandName,
    *,
    actor: str,
    device_id: str | None = None,
    selector: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    ttl_s: int = 3600,
    messaging: CommandPublisher | None = None,
) -> list[Command]:
    """Create and publish a command for one device or every device matching `selector`."""
    if (device_id is None) == (selector is None):
        raise InvalidInputError("name either device_id or a label selector, not both")
    if device_id is not None:
        device = get_device(session, device_id)
        if device.decommissioned:
            raise ConflictError(f"device {device_id} is decommissioned")
        targets = [device.id]
    else:
        targets = [d.id for d in list_devices(session, labels=selector or {}, limit=1_000_000)]
    now = utcnow()
    rows = [
        Command(
            id=uuid.uuid4().hex,
            device_id=target,
            name=name.value,
            args=dict(args or {}),
            created_by=actor,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        for target in targets
    ]
    for row in rows:
        session.add(row)
    record(session, actor, "command.send", name.value, devices=len(rows), selector=dict(selector or {}))
    session.commit()
    if messaging is not None:
        for row in rows:
            try:
                messaging.publish_command(to_message(row))
            except Exception as exc:  # a broker hiccup leaves the row pending; it goes out on reconnect
                logger.warning("command %s to %s not sent now: %s", row.id, row.device_id, exc)
                continue
            # Conditional: a fast device may have answered already (the ingest writer set
            # succeeded/failed), and "sent" must not overwrite its result.
            session.execute(
                update(Command)
                .where(col(Command.id) == row.id, col(Command.status) == CommandStatus.PENDING.value)
                .values(status=CommandStatus.SENT.value)
            )
        session.commit()
        for row in rows:
            session.refresh(row)
    return rows


def expire_commands(session: Session) -> int:
    """Mark unanswered commands whose expiry passed as expired; return how many."""
    result = session.execute(
        update(Command)
        .where(
            col(Command.status).in_([CommandStatus.PENDING.value, CommandStatus.SENT.value]),
            col(Command.expires_at) < utcnow(),
        )
        .values(status=CommandStatus.EXPIRED.value)
    )
    session.commit()
    return int(cast(CursorResult[Any], result).rowcount or 0)


def list_commands(
    session: Session,
    *,
    device_id: str | None = None,
    status: CommandStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Command]:
    """Return commands, newest first."""
    expire_commands(session)
    query = select(Command).order_by(col(Command.created_at).desc(), col(Command.id)).offset(offset).limit(limit)
    if device_id is not None:
        query = query.where(Command.device_id == device_id)
    if status is not None:
        query = query.where(Command.status == status.value)
    return list(session.exec(query))
