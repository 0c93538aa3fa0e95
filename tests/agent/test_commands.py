"""Command delivery rules, table-driven: run once, answer once, refuse what does not belong."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.commands import CommandError, CommandHandler
from agent.store import Store
from shared.codec import encode
from shared.messages import Command, CommandName, CommandResult, utcnow

DEVICE = "dev-1"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path: Path) -> tuple[CommandHandler, list[CommandResult], list[str], Clock]:
    results: list[CommandResult] = []
    ran: list[str] = []

    def ping(args: dict[str, Any]) -> dict[str, Any]:
        ran.append("ping")
        return {"pong": True}

    def rollback(args: dict[str, Any]) -> dict[str, Any]:
        ran.append("rollback")
        raise CommandError("no previous version")

    clock = Clock()
    handler = CommandHandler(
        DEVICE,
        Store(tmp_path / "a.db"),
        {CommandName.PING: ping, CommandName.ROLLBACK: rollback},
        results.append,
        rate_per_minute=5,
        clock=clock,
    )
    return handler, results, ran, clock


def cmd(cid: str, name: CommandName = CommandName.PING, device: str = DEVICE, **kw: Any) -> bytes:
    return encode(Command(id=cid, device_id=device, name=name, **kw))


CASES: list[tuple[str, list[bytes], list[tuple[str, bool, str | None]], list[str], str]] = [
    ("ok", [cmd("c1")], [("c1", True, None)], ["ping"], "succeeded"),
    ("duplicate runs once", [cmd("c1"), cmd("c1")], [("c1", True, None)], ["ping"], "duplicate"),
    (
        "expired",
        [cmd("c1", expires_at=utcnow() - timedelta(seconds=1))],
        [("c1", False, "expired")],
        [],
        "expired",
    ),
    (
        "unknown name",
        [json.dumps({"kind": "command", "id": "c9", "device_id": DEVICE, "name": "format-disk"}).encode()],
        [("c9", False, "unknown command 'format-disk'")],
        [],
        "unknown",
    ),
    ("no action for it", [cmd("c2", CommandName.RESTART)], [("c2", False, "unknown command")], [], "unknown"),
    ("malformed without id", [b"{not json"], [], [], "malformed"),
    (
        "malformed args",
        [json.dumps({"kind": "command", "id": "c3", "device_id": DEVICE, "name": "ping", "args": 5}).encode()],
        [("c3", False, "malformed command")],
        [],
        "malformed",
    ),
    ("other device", [cmd("c4", device="dev-2")], [], [], "other_device"),
    ("action fails", [cmd("c5", CommandName.ROLLBACK)], [("c5", False, "no previous version")], ["rollback"], "failed"),
]


@pytest.mark.parametrize(
    ("payloads", "expected", "ran_expected", "counter"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_command_rules(
    setup: tuple[CommandHandler, list[CommandResult], list[str], Clock],
    payloads: list[bytes],
    expected: list[tuple[str, bool, str | None]],
    ran_expected: list[str],
    counter: str,
) -> None:
    handler, results, ran, _ = setup
    for payload in payloads:
        handler.handle(payload)
    assert [(r.id, r.ok) for r in results] == [(cid, ok) for cid, ok, _ in expected]
    for result, (_, _, error) in zip(results, expected, strict=True):
        assert (error is None and result.error is None) or (error is not None and error in (result.error or ""))
        assert result.device_id == DEVICE
    assert ran == ran_expected
    assert handler.counters[counter] >= 1


def test_a_flood_is_rate_limited_and_answered(
    setup: tuple[CommandHandler, list[CommandResult], list[str], Clock],
) -> None:
    handler, results, ran, clock = setup
    for i in range(20):
        handler.handle(cmd(f"f{i}"))
    assert len(ran) == 5  # the burst allowance
    assert len(results) == 20
    assert sum("rate limited" in (r.error or "") for r in results) == 15
    assert handler.counters["rate_limited"] == 15
    clock.now += 60  # a minute later the bucket is full again
    handler.handle(cmd("late"))
    assert results[-1].ok and len(ran) == 6
    handler.handle(cmd("f19"))  # a refused id does not run on redelivery either
    assert len(ran) == 6
