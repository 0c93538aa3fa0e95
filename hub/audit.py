"""Audit events: one row per change, written in the same transaction as the change."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from hub.models import AuditEvent

__all__ = ["list_events", "record"]


def record(session: Session, actor: str, action: str, subject: str = "", **details: Any) -> AuditEvent:
    """Add an audit event to the session; the caller's commit writes it with the change."""
    event = AuditEvent(actor=actor, action=action, subject=subject, details=details)
    session.add(event)
    return event


def list_events(session: Session, *, action: str | None = None, limit: int = 100) -> list[AuditEvent]:
    """Return the newest events first, optionally of one action."""
    query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    return list(session.exec(query))
