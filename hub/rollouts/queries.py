"""Reading rollouts back: one rollout, lists, its devices in cohort order, its timeline, device history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import ValidationError
from sqlmodel import Session, col, select

from hub.errors import NotFoundError
from hub.models import DeploymentHistory, Rollout, RolloutDevice, RolloutEvent
from hub.rollouts.plan import ACTIVE_STATES, RolloutState
from hub.rollouts.spec import RolloutSpec

__all__ = [
    "UnknownRolloutError",
    "active_rollout_ids",
    "chunks",
    "device_history",
    "events_of",
    "get_rollout",
    "list_rollouts",
    "members_of",
    "read_spec",
]


IN_CHUNK = 500  # ids per IN (...) query: SQLite allows 999 bound parameters


class UnknownRolloutError(NotFoundError):
    """No rollout with that id."""


def get_rollout(session: Session, rollout_id: str, *, for_update: bool = False) -> Rollout:
    """Return a rollout; raise UnknownRolloutError otherwise."""
    query = select(Rollout).where(Rollout.id == rollout_id)
    if for_update:
        query = query.with_for_update()
    rollout = session.exec(query).first()
    if rollout is None:
        raise UnknownRolloutError(f"no rollout {rollout_id!r}")
    return rollout


def list_rollouts(
    session: Session, *, model: str | None = None, active: bool | None = None, limit: int = 100
) -> list[Rollout]:
    """Return rollouts, newest first, optionally of one model or only active (or finished) ones."""
    query = select(Rollout).order_by(col(Rollout.created_at).desc()).limit(limit)
    if model is not None:
        query = query.where(Rollout.model == model)
    if active is not None:
        states = [s.value for s in ACTIVE_STATES]
        query = query.where(col(Rollout.state).in_(states) if active else col(Rollout.state).not_in(states))
    return list(session.exec(query))


def active_rollout_ids(session: Session) -> list[str]:
    """Return the ids of rollouts the controller must drive, oldest first."""
    query = select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value).order_by(col(Rollout.created_at))
    return list(session.exec(query))


def members_of(session: Session, rollout_id: str) -> list[RolloutDevice]:
    """Return a rollout's devices in cohort order."""
    query = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
    return sorted(session.exec(query), key=lambda r: (r.rank, r.device_id))


def events_of(session: Session, rollout_id: str, limit: int = 1000) -> list[RolloutEvent]:
    """Return a rollout's timeline, oldest first."""
    query = select(RolloutEvent).where(RolloutEvent.rollout_id == rollout_id).order_by(col(RolloutEvent.id))
    return list(session.exec(query.limit(limit)))


def device_history(
    session: Session, device_id: str, model: str | None = None, limit: int = 200
) -> list[DeploymentHistory]:
    """Return which versions a device was given and ran, newest first."""
    query = select(DeploymentHistory).where(DeploymentHistory.device_id == device_id)
    if model is not None:
        query = query.where(DeploymentHistory.model == model)
    return list(session.exec(query.order_by(col(DeploymentHistory.id).desc()).limit(limit)))


def chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    """Yield `items` in slices small enough for one IN (...) query."""
    for start in range(0, len(items), IN_CHUNK):
        yield items[start : start + IN_CHUNK]


def read_spec(rollout: Rollout) -> RolloutSpec | None:
    """Return a stored rollout's spec, or None when it no longer validates (a bad manual edit)."""
    try:
        return RolloutSpec.model_validate(rollout.spec)
    except ValidationError:
        return None
