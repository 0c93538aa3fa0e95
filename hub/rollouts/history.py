"""Deployment history: for every device and model, which version it was told to run and ran, and when.

Rollouts write their own entries (with the rollout's id) as they move devices.
`record_changes` fills in everything else, whoever made the change (``PUT
/devices/{id}/models/{name}``, an agent's own rollback, a device that converged later):
it compares each device's desired and reported versions with the newest entry of the
same kind and adds one where they differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from hub.models import DeploymentHistory, Device, utcnow

__all__ = ["DESIRED", "RAN", "latest_entries", "record_changes"]

DESIRED = "desired"
RAN = "active"


def latest_entries(session: Session) -> dict[tuple[str, str, str], tuple[str | None, str | None]]:
    """Return (version, rollout id) of the newest entry per (device, model, event)."""
    newest = (
        select(func.max(DeploymentHistory.id))
        .where(col(DeploymentHistory.event).in_([DESIRED, RAN]))
        .group_by(col(DeploymentHistory.device_id), col(DeploymentHistory.model), col(DeploymentHistory.event))
    )
    rows = session.exec(select(DeploymentHistory).where(col(DeploymentHistory.id).in_(newest)))
    return {(r.device_id, r.model, r.event): (r.version, r.rollout_id) for r in rows}


def _versions(state: Mapping[str, Any] | None, key: str) -> dict[str, str | None]:
    models = (state or {}).get("models")
    if not isinstance(models, Mapping):
        return {}
    return {name: (entry.get(key) if isinstance(entry, Mapping) else None) for name, entry in models.items()}


def _when(reported: Mapping[str, Any] | None, model: str) -> datetime:
    entry = ((reported or {}).get("models") or {}).get(model)
    raw = entry.get("updated_at") if isinstance(entry, Mapping) else None
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else utcnow()
    except ValueError:
        return utcnow()


def record_changes(session: Session) -> int:
    """Add history entries for every desired or running version that changed since the last entry; commit."""
    latest = latest_entries(session)
    known: dict[tuple[str, str], set[str]] = {}
    for device_id, model, event in latest:
        known.setdefault((device_id, event), set()).add(model)
    added = 0
    # Plain columns, not ORM objects: this pass reads the whole fleet.
    query = select(Device.id, Device.desired, Device.reported).where(col(Device.decommissioned).is_(False))
    for device_id, desired_state, reported in session.exec(query):
        desired = _versions(desired_state, "version")
        running = _versions(reported, "active")
        for event, versions in ((DESIRED, desired), (RAN, running)):
            for model in versions.keys() | known.get((device_id, event), set()):
                version = versions.get(model)
                last = latest.get((device_id, model, event))
                if (last[0] if last else None) == version:
                    continue
                # A version reached through a rollout is credited to it.
                told = latest.get((device_id, model, DESIRED))
                rollout_id = told[1] if event == RAN and told and told[0] == version else None
                session.add(
                    DeploymentHistory(
                        device_id=device_id,
                        model=model,
                        version=version,
                        event=event,
                        rollout_id=rollout_id,
                        actor=device_id if event == RAN else "",
                        ts=_when(reported, model) if event == RAN else utcnow(),
                    )
                )
                latest[(device_id, model, event)] = (version, rollout_id)
                added += 1
    session.commit()
    return added
