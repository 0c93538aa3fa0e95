"""A device that answers before the hub marks its command "sent" keeps its result."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, SQLModel, create_engine

from hub.fleet.commands import send_command
from hub.messaging.ingest import apply_result
from hub.models import Command, CommandStatus, Device
from shared.messages import Command as CommandMessage
from shared.messages import CommandName, CommandResult


def test_a_result_that_arrives_during_publish_is_not_overwritten_by_sent(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Device(id="dev-1", name="d"))
        session.commit()

    class FastDevice:
        """Publishing is instant and the device's result is stored before publish returns."""

        def publish_command(self, cmd: CommandMessage) -> None:
            with Session(engine) as other:
                apply_result(other, CommandResult(id=cmd.id, device_id=cmd.device_id, ok=True, output={"pong": True}))
                other.commit()

    with Session(engine) as session:
        rows = send_command(session, CommandName.PING, actor="test", device_id="dev-1", messaging=FastDevice())
        assert rows[0].status == CommandStatus.SUCCEEDED.value
    with Session(engine) as session:
        row = session.get(Command, rows[0].id)
        assert row is not None
        assert row.status == CommandStatus.SUCCEEDED.value and row.result == {"pong": True}
