"""Pure rollout logic: stable cohorts, the step planner and the rollout state machine.

Cohorts: a device's place is sha256(device id + rollout id), so a retried step or a
restarted hub picks the same devices, and two rollouts do not always hit the same ones.

State machine (events on the left, `InvalidTransition` for anything not listed)::

    pending --start--> running --step_passed(last)--> succeeded
    running --step_passed--> running (next step)     running --step_failed--> failed
    running|pending --pause--> paused --resume--> running
    running|paused|pending --promote--> succeeded (every device on the new version)
    running|paused|pending --abort--> aborted (every touched device reverted)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "Event",
    "InvalidTransition",
    "RolloutState",
    "Transition",
    "cohort_rank",
    "order_devices",
    "planned_devices",
    "step_count",
    "transition",
]


class RolloutState(StrEnum):
    """Lifecycle of a rollout."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


ACTIVE_STATES = frozenset({RolloutState.PENDING, RolloutState.RUNNING, RolloutState.PAUSED})
TERMINAL_STATES = frozenset({RolloutState.SUCCEEDED, RolloutState.FAILED, RolloutState.ABORTED})


class Event(StrEnum):
    """What can happen to a rollout."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"
    STEP_PASSED = "step_passed"
    STEP_FAILED = "step_failed"


class InvalidTransition(ValueError):
    """An event that the rollout's current state does not allow."""


@dataclass(frozen=True)
class Transition:
    """The outcome of an event: the new state and step, and whether to revert devices."""

    state: RolloutState
    step: int
    revert: bool = False


def transition(state: RolloutState, step: int, steps: int, event: Event) -> Transition:
    """Return where a rollout in `state` at `step` (of `steps`) goes on `event`."""
    s, e = state, event
    if s in TERMINAL_STATES:
        raise InvalidTransition(f"rollout is {s.value}; {e.value} is not possible")
    if e is Event.ABORT:
        return Transition(RolloutState.ABORTED, step, revert=True)
    if e is Event.PROMOTE:
        return Transition(RolloutState.SUCCEEDED, steps - 1)
    if e is Event.START and s is RolloutState.PENDING:
        return Transition(RolloutState.RUNNING, step)
    if e is Event.PAUSE and s in (RolloutState.PENDING, RolloutState.RUNNING):
        return Transition(RolloutState.PAUSED, step)
    if e is Event.RESUME and s is RolloutState.PAUSED:
        return Transition(RolloutState.RUNNING, step)
    if e is Event.STEP_PASSED and s is RolloutState.RUNNING:
        if step + 1 >= steps:
            return Transition(RolloutState.SUCCEEDED, step)
        return Transition(RolloutState.RUNNING, step + 1)
    if e is Event.STEP_FAILED and s is RolloutState.RUNNING:
        return Transition(RolloutState.FAILED, step, revert=True)
    raise InvalidTransition(f"rollout is {s.value}; {e.value} is not possible")


def cohort_rank(device_id: str, rollout_id: str) -> str:
    """Return the device's stable sort key in this rollout (a sha256 hex digest)."""
    return hashlib.sha256(f"{device_id}\x00{rollout_id}".encode()).hexdigest()


def order_devices(device_ids: Iterable[str], rollout_id: str) -> list[str]:
    """Return the devices in cohort order: the first ones move first."""
    return sorted(set(device_ids), key=lambda d: (cohort_rank(d, rollout_id), d))


def step_count(total: int, percent: float) -> int:
    """Return how many of `total` devices a step of `percent` covers (at least one)."""
    if total <= 0 or percent <= 0:
        return 0
    # round() first so 0.1 * 30 = 3.0000000000000004 does not become 4.
    return min(total, max(1, math.ceil(round(total * percent / 100.0, 9))))


def planned_devices(ordered: Sequence[str], percent: float, already_moved: Iterable[str] = ()) -> set[str]:
    """Return the devices that should run the new version at a step of `percent`.

    Devices already moved stay moved: a device that enrolls mid-rollout with a small
    rank must not push a running canary back to the old version.
    """
    return set(ordered[: step_count(len(ordered), percent)]) | set(already_moved)
