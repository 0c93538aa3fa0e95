"""Device commands from the hub: validate, refuse or run once, answer through the outbox.

Every command that names this device and carries a usable id gets a `CommandResult`:
unknown names, malformed arguments, expired commands and rate-limited floods get one
saying so. Ids are claimed in the store before running, so a command delivered twice
(QoS 1 redelivery, a hub resend) runs once. A command addressed to another device is
refused and counted, never run. Actions run on one worker thread, in arrival order, so
a slow `deploy` never blocks the MQTT loop.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from agent.errors import AgentError
from agent.store import Store
from shared.codec import ProtocolError, decode
from shared.messages import Command, CommandName, CommandResult
from shared.topics import TopicError, validate_id

__all__ = ["Action", "CommandError", "CommandHandler"]

logger = logging.getLogger(__name__)

Action = Callable[[dict[str, Any]], dict[str, Any]]


class CommandError(AgentError):
    """A command that cannot be carried out; its message becomes the result's error."""


class _RateLimit:
    """A token bucket: `per_minute` commands a minute, bursts up to the same number."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.tokens = float(per_minute)
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.per_minute), self.tokens + (now - self.last) * self.per_minute / 60.0)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class CommandHandler:
    """Turns raw command payloads into at most one run each and exactly one result each."""

    def __init__(
        self,
        device_id: str,
        store: Store,
        actions: Mapping[CommandName, Action],
        emit: Callable[[CommandResult], None],
        rate_per_minute: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.store = store
        self.actions = actions
        self.emit = emit
        self.counters: Counter[str] = Counter()
        self.limit = _RateLimit(rate_per_minute, clock)
        self._queue: queue.Queue[Command | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run accepted commands on a worker thread (without it, `handle` runs them inline)."""
        self._thread = threading.Thread(target=self._work, name="commands", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the command in progress and stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    def handle(self, raw: bytes) -> None:
        """Take one payload from the commands topic; never raises."""
        try:
            command = decode(raw, Command)
        except ProtocolError as exc:
            self._malformed(raw, str(exc))
            return
        if command.device_id != self.device_id:
            self.counters["other_device"] += 1
            logger.warning(
                "refused command %s for device %s (this is %s)", command.id, command.device_id, self.device_id
            )
            return
        if not self.limit.allow():
            self.counters["rate_limited"] += 1
            if self.store.claim_command(command.id):
                self._result(command.id, False, error=f"rate limited: over {self.limit.per_minute} commands a minute")
            return
        if not self.store.claim_command(command.id):
            self.counters["duplicate"] += 1
            logger.info("command %s was already executed; not running it again", command.id)
            return
        if command.expired():
            self.counters["expired"] += 1
            assert command.expires_at is not None
            self._result(command.id, False, error=f"expired at {command.expires_at.isoformat()}; not run")
            return
        self.counters["accepted"] += 1
        if self._thread is None:
            self._run(command)
        else:
            self._queue.put(command)

    def _malformed(self, raw: bytes, detail: str) -> None:
        """Answer a payload that is not a valid command when it names this device and an id."""
        body: Any = None
        try:
            body = json.loads(raw)
            command_id = validate_id(str(body["id"]), "command id") if isinstance(body, dict) else None
            device = body.get("device_id") if isinstance(body, dict) else None
        except (ValueError, KeyError, TopicError):
            command_id, device = None, None
        name = body.get("name") if isinstance(body, dict) and command_id else None
        unknown = name is not None and name not in {n.value for n in CommandName}
        self.counters["unknown" if unknown else "malformed"] += 1
        logger.warning("rejected command payload: %s", detail)
        if command_id is None or device != self.device_id or not self.store.claim_command(command_id):
            return
        error = f"unknown command {name!r}" if unknown else f"malformed command: {detail}"
        self._result(command_id, False, error=error[:4096])

    def _work(self) -> None:
        while (command := self._queue.get()) is not None:
            self._run(command)

    def _run(self, command: Command) -> None:
        action = self.actions.get(command.name)
        if action is None:
            self.counters["unknown"] += 1
            self._result(command.id, False, error=f"unknown command {command.name.value!r}")
            return
        try:
            output = action(dict(command.args))
        except (AgentError, ValidationError, ValueError, TypeError, KeyError) as exc:
            self.counters["failed"] += 1
            self._result(command.id, False, error=f"{command.name.value} failed: {exc}"[:4096])
            return
        except Exception as exc:  # a bug in one action must not end the worker
            logger.exception("command %s (%s) crashed", command.id, command.name.value)
            self.counters["failed"] += 1
            self._result(command.id, False, error=f"{command.name.value} crashed: {exc}"[:4096])
            return
        self.counters["succeeded"] += 1
        self._result(command.id, True, output=output)

    def _result(
        self, command_id: str, ok: bool, output: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        self.emit(CommandResult(id=command_id, device_id=self.device_id, ok=ok, output=output, error=error))
