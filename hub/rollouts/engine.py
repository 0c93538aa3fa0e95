"""Rollouts: move a fleet to a model version step by step, judge each step, promote or roll back.

The rollout's state lives in the DB (Rollout, RolloutDevice, RolloutEvent), so every call
here starts from what is stored: `advance` is one idempotent reconcile step that the
controller (hub.rollouts.controller) runs in a loop, and a hub restarted mid-rollout simply
carries on. Devices move through `hub.fleet.devices.stage_desired` (`update_desired`'s change
without its commit), a few hundred per transaction; each retained DesiredState is
published after its commit.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import ConflictError, InvalidInputError
from hub.fleet.devices import DesiredPublisher, stage_desired
from hub.models import DeploymentHistory, Device, Rollout, RolloutDevice, RolloutEvent, utcnow
from hub.registry import desired_model, resolve_version
from hub.rollouts.analysis import (
    Outcome,
    StepEvidence,
    Verdict,
    VerdictKind,
    analyse,
    classify,
    observe,
)
from hub.rollouts.plan import (
    Event,
    InvalidTransition,
    RolloutState,
    cohort_rank,
    planned_devices,
    transition,
)
from hub.rollouts.queries import get_rollout, list_rollouts, members_of, read_spec
from hub.rollouts.spec import RolloutSpec, Selector
from hub.rollouts.telemetry import cohort_metrics
from shared import tracing
from shared.messages import DesiredModel, DesiredState

__all__ = [
    "DeviceState",
    "RolloutConflictError",
    "RolloutContext",
    "RolloutStateError",
    "act",
    "advance",
    "complete_reverts",
    "create_rollout",
]

logger = logging.getLogger(__name__)


class RolloutConflictError(ConflictError):
    """Another active rollout of the same model covers some of the same devices."""


class RolloutStateError(ConflictError):
    """The rollout's state does not allow the action (resume a running one, abort a finished one)."""


class DeviceState:
    """Values of RolloutDevice.state."""

    PENDING = "pending"
    UPDATED = "updated"
    FAILED = "failed"
    BASELINE = "baseline"
    REVERTED = "reverted"


@dataclass(frozen=True)
class RolloutContext:
    """What moving devices needs: the settings (manifest URLs) and the MQTT publisher."""

    settings: HubSettings
    messaging: DesiredPublisher | None = None


def _actor(rollout: Rollout) -> str:
    return f"rollout:{rollout.id}"


def _event(session: Session, rollout: Rollout, kind: str, message: str, actor: str = "", **details: object) -> None:
    session.add(
        RolloutEvent(
            rollout_id=rollout.id, kind=kind, step=rollout.step, message=message, actor=actor, details=dict(details)
        )
    )
    logger.info("rollout %s: %s: %s", rollout.id, kind, message)


def _desired_version(device: Device, model: str) -> str | None:
    entry = ((device.desired or {}).get("models") or {}).get(model)
    return entry.get("version") if isinstance(entry, dict) else None


def _fleet(session: Session) -> list[Device]:
    return list(session.exec(select(Device).where(col(Device.decommissioned).is_(False))))


@tracing.traced("hub.rollout.create")
def create_rollout(session: Session, spec: RolloutSpec, *, actor: str) -> Rollout:
    """Register a rollout in state running; the controller moves the first cohort on its next tick."""
    resolve_version(session, spec.model, spec.version)  # 404 for an unknown model or version
    fleet = _fleet(session)
    matched = [d for d in fleet if spec.selector.matches(d.id, d.labels)]
    if not matched:
        raise InvalidInputError("the selector matches no device")
    devices = [(d.id, d.labels) for d in fleet]
    for other in list_rollouts(session, model=spec.model, active=True):
        if _selector_of(other).overlaps(spec.selector, devices):
            raise RolloutConflictError(
                f"rollout {other.id} ({spec.model} {other.version}, {other.state}) already covers some of these devices"
            )
    baseline = spec.baseline_version
    if baseline is None:
        current = Counter(v for d in matched if (v := _desired_version(d, spec.model)) and v != spec.version)
        baseline = current.most_common(1)[0][0] if current else None
    if baseline is not None:
        resolve_version(session, spec.model, baseline)
    rollout = Rollout(
        id=f"ro-{uuid.uuid4().hex[:12]}",
        model=spec.model,
        version=spec.version,
        baseline_version=baseline,
        spec=spec.model_dump(mode="json"),
        state=RolloutState.RUNNING.value,
        step=0,
        step_started_at=utcnow(),
        created_by=actor,
    )
    session.add(rollout)
    session.flush()
    for device in matched:
        session.add(_member(rollout, device))
    _event(
        session,
        rollout,
        "created",
        f"{spec.model} {baseline or '(none)'} -> {spec.version} on {len(matched)} devices, "
        f"{spec.strategy.value} steps {spec.steps}",
        actor,
    )
    record(session, actor, "rollout.create", f"rollout:{rollout.id}", model=spec.model, version=spec.version)
    session.commit()
    return rollout


def _selector_of(rollout: Rollout) -> Selector:
    """Return a stored rollout's selector; an unreadable one counts as covering every device."""
    spec = read_spec(rollout)
    if spec is None:
        logger.error("rollout %s has an unreadable spec; treating it as covering every device", rollout.id)
        return Selector(all=True)
    return spec.selector


def _member(rollout: Rollout, device: Device) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=rollout.id,
        device_id=device.id,
        rank=cohort_rank(device.id, rollout.id),
        previous_version=_desired_version(device, rollout.model),
    )


class _Moves:
    """Desired states staged in the session: committed together every `size` devices, then published.

    One transaction per device made a 5,000-device step take 5,000 commits. The
    resolved model entry of each version is looked up once.
    """

    def __init__(self, session: Session, ctx: RolloutContext, size: int = 250) -> None:
        self.session, self.ctx, self.size = session, ctx, size
        self.staged: list[DesiredState] = []
        self._entries: dict[tuple[str, str], DesiredModel] = {}

    def entry(self, model: str, version: str | None) -> DesiredModel | None:
        """Return the desired-state entry of `model` at `version` (None removes the model)."""
        if version is None:
            return None
        key = (model, version)
        if key not in self._entries:
            model_row, version_row = resolve_version(self.session, model, version)
            self._entries[key] = desired_model(self.ctx.settings, model_row, version_row)
        return self._entries[key]

    def add(self, state: DesiredState) -> None:
        self.staged.append(state)
        if len(self.staged) >= self.size:
            self.commit()

    def commit(self) -> None:
        """Commit what is staged, then publish it."""
        self.session.commit()
        staged, self.staged = self.staged, []
        if self.ctx.messaging is not None:
            for state in staged:
                self.ctx.messaging.publish_desired(state)


def _assign(rollout: Rollout, row: RolloutDevice, version: str | None, state: str, moves: _Moves) -> None:
    """Point one device's desired state at `version` (None removes the model) and record it."""
    session = moves.session
    row.assigned_version, row.state, row.updated_at = version, state, utcnow()
    if state != DeviceState.REVERTED:
        row.moved_at_step = rollout.step
    session.add(row)
    session.add(
        DeploymentHistory(
            device_id=row.device_id,
            model=rollout.model,
            version=version,
            event="desired",
            rollout_id=rollout.id,
            actor=_actor(rollout),
        )
    )
    entry = moves.entry(rollout.model, version)
    # The rows above land in the same transaction as the desired state.
    desired = stage_desired(session, row.device_id, {rollout.model: entry}, actor=_actor(rollout))
    moves.add(desired)


def _sync_members(
    session: Session, rollout: Rollout, spec: RolloutSpec
) -> tuple[list[RolloutDevice], dict[str, Device]]:
    """Add devices that match now (enrolled mid-rollout); return live members in cohort order."""
    rows = {r.device_id: r for r in members_of(session, rollout.id)}
    fleet = {d.id: d for d in _fleet(session)}
    for device in fleet.values():
        if device.id not in rows and spec.selector.matches(device.id, device.labels):
            rows[device.id] = _member(rollout, device)
            session.add(rows[device.id])
            _event(session, rollout, "device_joined", f"{device.id} joined the rollout")
    live = sorted((r for r in rows.values() if r.device_id in fleet), key=lambda r: (r.rank, r.device_id))
    return live, fleet


def _move_cohorts(
    session: Session, ctx: RolloutContext, rollout: Rollout, spec: RolloutSpec, rows: Sequence[RolloutDevice]
) -> None:
    """Give the step's cohort the new version and newcomers outside it the baseline."""
    moved = {r.device_id for r in rows if r.assigned_version == rollout.version}
    target = planned_devices([r.device_id for r in rows], spec.steps[rollout.step], moved)
    moves = _Moves(session, ctx)
    count = 0
    for row in rows:
        if row.device_id in target and row.assigned_version != rollout.version:
            _assign(rollout, row, rollout.version, DeviceState.PENDING, moves)
            count += 1
        elif (
            row.device_id not in target
            and row.assigned_version is None
            and row.previous_version is None
            and rollout.baseline_version is not None
        ):
            # A device with no version of this model yet: it gets its cohort's, the baseline.
            _assign(rollout, row, rollout.baseline_version, DeviceState.BASELINE, moves)
    moves.commit()
    if count:
        _event(
            session,
            rollout,
            "moved",
            f"step {rollout.step + 1} ({spec.steps[rollout.step]:g}%): {count} devices -> {rollout.version}",
        )


def _judge(
    session: Session, rollout: Rollout, spec: RolloutSpec, rows: Sequence[RolloutDevice], fleet: dict[str, Device]
) -> Verdict:
    """Refresh each moved device's outcome and analyse the step."""
    moved = [r for r in rows if r.assigned_version == rollout.version]
    observations = []
    for row in moved:
        device = fleet[row.device_id]
        obs = observe(row.device_id, device.online, device.reported, rollout.model)
        observations.append(obs)
        outcome = classify(obs, rollout.version)
        state = {Outcome.UPDATED: DeviceState.UPDATED, Outcome.FAILED: DeviceState.FAILED}.get(
            outcome, DeviceState.PENDING
        )
        if state != row.state:
            row.state, row.error, row.updated_at = state, obs.error, utcnow()
            session.add(row)
            if state == DeviceState.FAILED:
                # What the device runs is recorded by hub.rollouts.history; the failure only here.
                session.add(
                    DeploymentHistory(
                        device_id=row.device_id,
                        model=rollout.model,
                        version=rollout.version,
                        event="rolled_back",
                        rollout_id=rollout.id,
                        actor=row.device_id,
                    )
                )
    since = rollout.step_started_at or rollout.created_at
    moved_ids = [r.device_id for r in moved]
    others = [r.device_id for r in rows if r.assigned_version != rollout.version]
    criteria = spec.analysis
    evidence = StepEvidence(
        version=rollout.version,
        devices=tuple(observations),
        elapsed_s=(utcnow() - since).total_seconds(),
        hold_s=spec.step_pause_s,
        canary=cohort_metrics(session, criteria, rollout.model, moved_ids, since, rollout.version, True),
        baseline=cohort_metrics(session, criteria, rollout.model, others, since, rollout.version, False),
    )
    return analyse(evidence, criteria)


def _revert(session: Session, ctx: RolloutContext, rollout: Rollout) -> int:
    """Give every device this rollout moved its previous version back; return how many.

    Idempotent, so a hub that died half-way through finishes the job on restart; a device
    whose desired state another change has moved on since is left alone.
    """
    moves = _Moves(session, ctx)
    count = 0
    for row in members_of(session, rollout.id):
        if row.assigned_version != rollout.version or row.state == DeviceState.REVERTED:
            continue
        device = session.get(Device, row.device_id)
        if device is None or device.decommissioned or _desired_version(device, rollout.model) != rollout.version:
            row.state = DeviceState.REVERTED
            session.add(row)
            continue
        _assign(rollout, row, row.previous_version, DeviceState.REVERTED, moves)
        count += 1
    moves.commit()
    return count


def complete_reverts(session: Session, ctx: RolloutContext) -> int:
    """Finish the rollbacks of failed or aborted rollouts that a crash interrupted; return devices reverted."""
    ended = [RolloutState.FAILED.value, RolloutState.ABORTED.value]
    query = (
        select(Rollout.id)
        .join(RolloutDevice, col(RolloutDevice.rollout_id) == col(Rollout.id))
        .where(
            col(Rollout.state).in_(ended),
            col(RolloutDevice.assigned_version) == col(Rollout.version),
            col(RolloutDevice.state) != DeviceState.REVERTED,
        )
        .distinct()
    )
    total = 0
    for rollout_id in list(session.exec(query)):
        rollout = get_rollout(session, rollout_id)
        reverted = _revert(session, ctx, rollout)
        _event(session, rollout, "rolled_back", f"{reverted} more devices returned to their previous version")
        session.commit()
        total += reverted
    return total


def _finish(session: Session, rollout: Rollout, state: RolloutState, reason: str) -> None:
    rollout.state, rollout.reason = state.value, reason
    rollout.finished_at = rollout.updated_at = utcnow()
    session.add(rollout)


@tracing.traced("hub.rollout.step")
def advance(session: Session, ctx: RolloutContext, rollout_id: str) -> Rollout:
    """Run one reconcile step of a running rollout: add newcomers, move cohorts, judge, act."""
    rollout = get_rollout(session, rollout_id, for_update=True)
    if rollout.state != RolloutState.RUNNING.value:
        return rollout
    spec = read_spec(rollout)
    if spec is None:
        # Retrying cannot fix a stored spec; stop and say so instead of failing every tick.
        logger.error("rollout %s has an unreadable spec; pausing it (abort is the way out)", rollout.id)
        rollout.state, rollout.reason, rollout.updated_at = RolloutState.PAUSED.value, "unreadable spec", utcnow()
        _event(session, rollout, "paused", "the stored spec does not validate; abort this rollout")
        session.add(rollout)
        session.commit()
        return rollout
    rows, fleet = _sync_members(session, rollout, spec)
    _move_cohorts(session, ctx, rollout, spec, rows)
    verdict = _judge(session, rollout, spec, rows, fleet)
    last = len(spec.steps)
    if verdict.kind is VerdictKind.FAIL:
        result = transition(RolloutState.RUNNING, rollout.step, last, Event.STEP_FAILED)
        _event(session, rollout, "step_failed", verdict.reason, updated=verdict.updated, failed=verdict.failed)
        _finish(session, rollout, result.state, verdict.reason)
        session.commit()
        reverted = _revert(session, ctx, rollout)
        _event(session, rollout, "rolled_back", f"{reverted} devices returned to their previous version")
    elif verdict.kind is VerdictKind.PASS:
        result = transition(RolloutState.RUNNING, rollout.step, last, Event.STEP_PASSED)
        _event(session, rollout, "step_passed", verdict.reason, updated=verdict.updated)
        if result.state is RolloutState.SUCCEEDED:
            _finish(session, rollout, result.state, f"{rollout.version} runs on every device of the rollout")
        else:
            rollout.step, rollout.step_started_at, rollout.reason = result.step, utcnow(), verdict.reason
            if spec.require_approval:
                rollout.state = RolloutState.PAUSED.value
                _event(session, rollout, "paused", "waiting for approval (resume or promote)")
            rollout.updated_at = utcnow()
            session.add(rollout)
    elif verdict.reason != rollout.reason:
        rollout.reason, rollout.updated_at = verdict.reason, utcnow()
        session.add(rollout)
    session.commit()
    return rollout


@tracing.traced("hub.rollout.action")
def act(
    session: Session, ctx: RolloutContext, rollout_id: str, event: Event, *, actor: str, reason: str = ""
) -> Rollout:
    """Apply an operator action: pause, resume, promote or abort."""
    rollout = get_rollout(session, rollout_id, for_update=True)
    spec = read_spec(rollout)
    if spec is None and event is not Event.ABORT:
        raise RolloutStateError(f"rollout {rollout.id} has an unreadable spec; it can only be aborted")
    steps = len(spec.steps) if spec is not None else rollout.step + 1
    try:
        result = transition(RolloutState(rollout.state), rollout.step, steps, event)
    except InvalidTransition as exc:
        raise RolloutStateError(str(exc)) from exc
    message = reason or f"{event.value} by {actor}"
    _event(session, rollout, event.value, message, actor)
    record(session, actor, f"rollout.{event.value}", f"rollout:{rollout.id}", reason=reason)
    if result.state in (RolloutState.SUCCEEDED, RolloutState.ABORTED):
        rollout.step = result.step
        _finish(session, rollout, result.state, message)
    else:
        rollout.state, rollout.updated_at = result.state.value, utcnow()
        if result.state is RolloutState.RUNNING:
            rollout.step_started_at = utcnow()  # a pause does not count as observation time
        session.add(rollout)
    session.commit()
    if event is Event.PROMOTE and spec is not None:
        rows, _fleet_now = _sync_members(session, rollout, spec)
        moves = _Moves(session, ctx)
        for row in rows:
            if row.assigned_version != rollout.version:
                _assign(rollout, row, rollout.version, DeviceState.PENDING, moves)
        moves.commit()
        _event(session, rollout, "moved", f"promoted: every device -> {rollout.version}")
    if result.revert:
        reverted = _revert(session, ctx, rollout)
        _event(session, rollout, "rolled_back", f"{reverted} devices returned to their previous version")
    session.commit()
    return rollout
