"""Commands: send to a device or a label selector, list them with their results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from sqlmodel import select

from hub.api.deps import MessagingDep, Operator, Viewer
from hub.api.schemas import ID_PATTERN, CommandCreate, CommandPublic
from hub.db import SessionDep
from hub.errors import NotFoundError
from hub.fleet import commands
from hub.models import Command, CommandStatus

router = APIRouter(tags=["commands"])


def _public(row: Command) -> CommandPublic:
    return CommandPublic.model_validate(row, from_attributes=True)


@router.post("/commands", status_code=status.HTTP_201_CREATED)
def send_command(
    body: CommandCreate, session: SessionDep, caller: Operator, messaging: MessagingDep
) -> list[CommandPublic]:
    """Send a command to one device or to every device matching the selector."""
    rows = commands.send_command(
        session,
        body.name,
        actor=caller.actor,
        device_id=body.device_id,
        selector=body.selector,
        args=body.args,
        ttl_s=body.ttl_s,
        messaging=messaging,
    )
    return [_public(r) for r in rows]


@router.get("/commands")
def list_commands(
    session: SessionDep,
    _caller: Viewer,
    device_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    status: CommandStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[CommandPublic]:
    """List commands, newest first, with their results."""
    rows = commands.list_commands(session, device_id=device_id, status=status, limit=limit, offset=offset)
    return [_public(r) for r in rows]


@router.get("/commands/{command_id}")
def get_command(
    command_id: Annotated[str, Path(pattern=ID_PATTERN)], session: SessionDep, _caller: Viewer
) -> CommandPublic:
    """Return one command and its result."""
    commands.expire_commands(session)
    row = session.exec(select(Command).where(Command.id == command_id)).first()
    if row is None:
        raise NotFoundError(f"no command {command_id!r}")
    return _public(row)
