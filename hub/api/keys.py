"""API keys and enrollment tokens (admin only), and the audit log."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from sqlmodel import col, select

from hub import audit, security
from hub.api.deps import Admin, SettingsDep
from hub.api.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    AuditEventPublic,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollmentTokenPublic,
)
from hub.db import SessionDep
from hub.models import ApiKey, EnrollmentToken
from hub.tls import enroll_command

router = APIRouter(tags=["credentials"])

RowId = Annotated[int, Path(ge=1, le=2**62)]


@router.post("/api-keys", status_code=status.HTTP_201_CREATED)
def create_api_key(body: ApiKeyCreate, session: SessionDep, caller: Admin) -> ApiKeyCreated:
    """Create an API key; its secret is in this answer only."""
    key, secret = security.create_api_key(session, body.name, body.role, actor=caller.actor, rate_limit=body.rate_limit)
    return ApiKeyCreated(**ApiKeyPublic.model_validate(key, from_attributes=True).model_dump(), key=secret)


@router.get("/api-keys")
def list_api_keys(session: SessionDep, _caller: Admin) -> list[ApiKeyPublic]:
    """List API keys (never their secrets)."""
    rows = session.exec(select(ApiKey).order_by(col(ApiKey.id))).all()
    return [ApiKeyPublic.model_validate(row, from_attributes=True) for row in rows]


@router.delete("/api-keys/{key_id}")
def revoke_api_key(key_id: RowId, session: SessionDep, caller: Admin) -> ApiKeyPublic:
    """Revoke an API key at once."""
    key = security.revoke_api_key(session, key_id, actor=caller.actor)
    return ApiKeyPublic.model_validate(key, from_attributes=True)


@router.post("/enrollment-tokens", status_code=status.HTTP_201_CREATED)
def create_enrollment_token(
    body: EnrollmentTokenCreate, session: SessionDep, settings: SettingsDep, caller: Admin
) -> EnrollmentTokenCreated:
    """Create an enrollment token; its secret is in this answer only."""
    token, secret = security.create_enrollment_token(
        session,
        actor=caller.actor,
        max_uses=body.max_uses,
        expires_in=timedelta(seconds=body.expires_in_s) if body.expires_in_s is not None else None,
        labels=body.labels,
        note=body.note,
        device_label_keys=body.device_label_keys,
    )
    public = EnrollmentTokenPublic.model_validate(token, from_attributes=True)
    return EnrollmentTokenCreated(**public.model_dump(), token=secret, enroll_command=enroll_command(settings, secret))


@router.get("/enrollment-tokens")
def list_enrollment_tokens(session: SessionDep, _caller: Admin) -> list[EnrollmentTokenPublic]:
    """List enrollment tokens with their uses (never their secrets)."""
    rows = session.exec(select(EnrollmentToken).order_by(col(EnrollmentToken.id))).all()
    return [EnrollmentTokenPublic.model_validate(row, from_attributes=True) for row in rows]


@router.delete("/enrollment-tokens/{token_id}")
def revoke_enrollment_token(token_id: RowId, session: SessionDep, caller: Admin) -> EnrollmentTokenPublic:
    """Revoke an enrollment token; devices it enrolled keep working."""
    token = security.revoke_enrollment_token(session, token_id, actor=caller.actor)
    return EnrollmentTokenPublic.model_validate(token, from_attributes=True)


@router.get("/audit")
def list_audit_events(
    session: SessionDep,
    _caller: Admin,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventPublic]:
    """Return the newest audit events first."""
    return [
        AuditEventPublic.model_validate(e, from_attributes=True)
        for e in audit.list_events(session, action=action, limit=limit)
    ]
