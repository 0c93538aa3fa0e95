"""Rollouts: start, list, inspect (progress per step, state per device, timeline), pause, resume, promote, abort."""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from hub.api.deps import MessagingDep, Operator, SettingsDep, Viewer
from hub.db import SessionDep
from hub.models import DeploymentHistory, Device, Rollout
from hub.rollouts import engine as rollouts
from hub.rollouts.analysis import observe
from hub.rollouts.plan import Event, step_count
from hub.rollouts.queries import device_history, events_of, get_rollout, list_rollouts, members_of, read_spec
from hub.rollouts.spec import RolloutSpec

__all__ = [
    "DeploymentPublic",
    "RolloutAction",
    "RolloutDetail",
    "RolloutDevicePublic",
    "RolloutEventPublic",
    "RolloutStepPublic",
    "RolloutSummary",
    "router",
]

router = APIRouter(tags=["rollouts"])

RolloutIdPath = Annotated[str, Path(pattern=r"^ro-[0-9a-f]{1,60}$", max_length=64)]


class RolloutAction(BaseModel):
    """Optional body of the operator actions."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1024)


class RolloutSummary(BaseModel):
    """A rollout in a list: where it stands and how many devices run the new version."""

    id: str
    model: str
    version: str
    baseline_version: str | None
    strategy: str
    state: str
    step: int = Field(description="current step, 1-based")
    steps: list[float]
    reason: str
    devices: int
    updated: int
    failed: int
    pending: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutStepPublic(BaseModel):
    """One step: its percentage, how many devices it covers, and whether it is done."""

    step: int
    percent: float
    devices: int
    status: str = Field(description="done | current | next")


class RolloutDevicePublic(BaseModel):
    """One device of a rollout."""

    device_id: str
    position: int = Field(description="place in the cohort order, 0 moves first")
    cohort_step: int = Field(description="the step (1-based) at which this device moves")
    previous_version: str | None
    assigned_version: str | None
    state: str
    error: str | None
    online: bool
    active_version: str | None
    update_state: str | None
    updated_at: datetime


class RolloutEventPublic(BaseModel):
    """One entry of the timeline."""

    ts: datetime
    kind: str
    step: int
    message: str
    actor: str
    details: dict[str, Any]


class RolloutDetail(RolloutSummary):
    """A rollout with its spec, per-step progress, per-device state and timeline."""

    spec: dict[str, Any]
    progress: list[RolloutStepPublic]
    device_states: list[RolloutDevicePublic]
    events: list[RolloutEventPublic]


class DeploymentPublic(BaseModel):
    """One entry of a device's deployment history."""

    ts: datetime
    device_id: str
    model: str
    version: str | None
    event: str
    rollout_id: str | None
    actor: str


def _summary_fields(session: Session, rollout: Rollout) -> dict[str, Any]:
    spec = read_spec(rollout)
    rows = members_of(session, rollout.id)
    counts = Counter(r.state for r in rows if r.assigned_version == rollout.version)
    total = len(rows)
    return {
        "id": rollout.id,
        "model": rollout.model,
        "version": rollout.version,
        "baseline_version": rollout.baseline_version,
        "strategy": spec.strategy.value if spec else "unreadable",
        "state": rollout.state,
        "step": rollout.step + 1,
        "steps": spec.steps if spec else [],
        "reason": rollout.reason,
        "devices": total,
        "updated": counts[rollouts.DeviceState.UPDATED],
        "failed": counts[rollouts.DeviceState.FAILED],
        "pending": counts[rollouts.DeviceState.PENDING],
        "created_by": rollout.created_by,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "finished_at": rollout.finished_at,
    }


def rollout_summary(session: Session, rollout: Rollout) -> RolloutSummary:
    """Return the list form of a rollout."""
    return RolloutSummary(**_summary_fields(session, rollout))


def rollout_detail(session: Session, rollout: Rollout) -> RolloutDetail:
    """Return the full view of a rollout."""
    spec = read_spec(rollout)
    steps = spec.steps if spec else []
    rows = members_of(session, rollout.id)
    total = len(rows)
    counts = [step_count(total, p) for p in steps]
    progress = [
        RolloutStepPublic(
            step=i + 1,
            percent=p,
            devices=counts[i],
            status="done"
            if i < rollout.step or rollout.state == "succeeded"
            else "current"
            if i == rollout.step
            else "next",
        )
        for i, p in enumerate(steps)
    ]
    ids = [r.device_id for r in rows]
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))} if ids else {}
    states = []
    for position, row in enumerate(rows):
        device = devices.get(row.device_id)
        obs = observe(row.device_id, bool(device and device.online), device.reported if device else None, rollout.model)
        states.append(
            RolloutDevicePublic(
                device_id=row.device_id,
                position=position,
                cohort_step=next((i + 1 for i, c in enumerate(counts) if position < c), len(counts)),
                previous_version=row.previous_version,
                assigned_version=row.assigned_version,
                state=row.state,
                error=row.error,
                online=obs.online,
                active_version=obs.active,
                update_state=obs.state.value if obs.state else None,
                updated_at=row.updated_at,
            )
        )
    events = [RolloutEventPublic.model_validate(e, from_attributes=True) for e in events_of(session, rollout.id)]
    return RolloutDetail(
        **_summary_fields(session, rollout), spec=rollout.spec, progress=progress, device_states=states, events=events
    )


def _locked(request: Request) -> AbstractContextManager[object]:
    controller = getattr(request.app.state, "rollout_controller", None)
    return controller.lock if controller is not None else nullcontext()


def _wake(request: Request) -> None:
    controller = getattr(request.app.state, "rollout_controller", None)
    if controller is not None:
        controller.wake()


@router.post("/rollouts", status_code=status.HTTP_201_CREATED)
def create_rollout(body: RolloutSpec, request: Request, session: SessionDep, caller: Operator) -> RolloutDetail:
    """Start a rollout; 409 if an active rollout of the same model covers some of the same devices."""
    with _locked(request):
        rollout = rollouts.create_rollout(session, body, actor=caller.actor)
    _wake(request)
    return rollout_detail(session, rollout)


@router.get("/rollouts")
def list_all(
    session: SessionDep,
    _caller: Viewer,
    model: Annotated[str | None, Query(max_length=128)] = None,
    active: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RolloutSummary]:
    """List rollouts, newest first."""
    return [rollout_summary(session, r) for r in list_rollouts(session, model=model, active=active, limit=limit)]


@router.get("/rollouts/{rollout_id}")
def get_one(rollout_id: RolloutIdPath, session: SessionDep, _caller: Viewer) -> RolloutDetail:
    """Return a rollout: progress per step, state per device and the timeline."""
    return rollout_detail(session, get_rollout(session, rollout_id))


@router.get("/deployments")
def deployments(
    session: SessionDep,
    _caller: Viewer,
    device_id: Annotated[str, Query(max_length=128)],
    model: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> list[DeploymentPublic]:
    """Return a device's deployment history (versions given and run), newest first."""
    rows: list[DeploymentHistory] = device_history(session, device_id, model, limit)
    return [DeploymentPublic.model_validate(r, from_attributes=True) for r in rows]


def _action(event: Event) -> Any:
    def handler(
        rollout_id: RolloutIdPath,
        request: Request,
        session: SessionDep,
        settings: SettingsDep,
        messaging: MessagingDep,
        caller: Operator,
        body: Annotated[RolloutAction | None, Body()] = None,
    ) -> RolloutDetail:
        ctx = rollouts.RolloutContext(settings, messaging)
        with _locked(request):
            rollout = rollouts.act(
                session, ctx, rollout_id, event, actor=caller.actor, reason=body.reason if body else ""
            )
        _wake(request)
        return rollout_detail(session, rollout)

    handler.__doc__ = {
        Event.PAUSE: "Pause a rollout: devices keep their versions, no step advances.",
        Event.RESUME: "Resume a paused rollout.",
        Event.PROMOTE: "Promote a rollout: every device gets the new version now, skipping the remaining steps.",
        Event.ABORT: "Abort a rollout: every device it moved returns to its previous version.",
    }[event]
    handler.__name__ = f"{event.value}_rollout"
    return handler


for _event in (Event.PAUSE, Event.RESUME, Event.PROMOTE, Event.ABORT):
    router.post(f"/rollouts/{{rollout_id}}/{_event.value}")(_action(_event))
