"""The manifest-signing key: its chain (devices and API keys), rotation and retirement (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel

from hub import signing_keys
from hub.api.deps import Admin, Caller, MessagingDep, SettingsDep, Viewer
from hub.db import SessionDep
from hub.models import SigningKey
from shared import routes
from shared.keys import KeyChain

router = APIRouter(tags=["signing keys"])

KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]


class SigningKeyPublic(BaseModel):
    """A signing key as the operator sees it (never its private half)."""

    key_id: str
    public_key: str
    previous_key_id: str | None
    state: str
    versions: int
    created_at: datetime
    created_by: str
    retired_at: datetime | None


class SigningKeyRetired(SigningKeyPublic):
    """A retired key, with the versions re-signed and how many devices' desired states changed."""

    resigned: list[str]
    devices: int


def _public(row: SigningKey, state: str, versions: int) -> SigningKeyPublic:
    return SigningKeyPublic(
        key_id=row.key_id,
        public_key=row.public_key,
        previous_key_id=row.previous_key_id,
        state=state,
        versions=versions,
        created_at=row.created_at,
        created_by=row.created_by,
        retired_at=row.retired_at,
    )


@router.get(routes.SIGNING_KEYS)
def get_chain(session: SessionDep, settings: SettingsDep, _caller: Caller) -> KeyChain:
    """Return the key chain devices follow: the current key, every endorsement and retirement."""
    return signing_keys.chain(session, settings)


@router.get(f"{routes.SIGNING_KEYS}/summary")
def list_signing_keys(session: SessionDep, settings: SettingsDep, _caller: Viewer) -> list[SigningKeyPublic]:
    """List every signing key, oldest first: current, valid (still trusted) or retired."""
    return [_public(k.row, k.state, k.versions) for k in signing_keys.list_keys(session, settings)]


@router.post(f"{routes.SIGNING_KEYS}/rotate", status_code=status.HTTP_201_CREATED)
def rotate_signing_key(session: SessionDep, settings: SettingsDep, caller: Admin) -> SigningKeyPublic:
    """Make a new signing key, endorsed by the current one; it signs every new manifest."""
    row = signing_keys.rotate_key(session, settings, actor=caller.actor)
    return _public(row, "current", 0)


@router.post(f"{routes.SIGNING_KEYS}/{{key_id}}/retire")
def retire_signing_key(
    key_id: KeyIdPath, session: SessionDep, settings: SettingsDep, messaging: MessagingDep, caller: Admin
) -> SigningKeyRetired:
    """Retire a key: what it signed is re-signed with the current key, and devices refuse it from now on."""
    done = signing_keys.retire_key(session, settings, key_id, actor=caller.actor, messaging=messaging)
    public = _public(done.key, "retired", 0)
    return SigningKeyRetired(**public.model_dump(), resigned=done.resigned, devices=len(done.states))
