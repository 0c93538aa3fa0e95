"""Rotating the manifest-signing key: the chain devices follow, retirement, re-signing.

One key signs at a time: the one in the signing key file (`HubSettings.signing_key`). The
`signing_key` table keeps the public half of every key the hub has signed with and the
statements of ``shared.keys`` that chain them:

- `rotate_key` makes a new key, endorses it with the current one (signed by both), records it
  and only then puts it in the key file; new manifests are signed with it from then on.
  Devices that know the old key accept the new one through the endorsement, and manifests the
  old key signed keep verifying, on old and new devices alike.
- `retire_key` is for when the fleet has moved on (or the old key leaked). A user expects
  retiring a key never to take a serving model down, so the hub re-signs with the current
  key every version the retired key signed and updates the desired state of each device that
  names one (the same version with a new manifest sha256: the agent swaps the signature in
  its journal without reloading the model). From then on, whatever the retired key signed is
  refused, by devices that have seen the signed retirement statement too.

The first key is recorded when the chain is first read, so hubs made before rotation existed
need no step. The private key of a rotated-out key is not kept: nothing needs it any more.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import ConflictError, NotFoundError
from hub.fleet.devices import DesiredPublisher, stage_desired
from hub.models import Device, Model, ModelVersion, SigningKey, utcnow
from hub.security import load_or_create_signing_key
from shared.keys import KeyChain, KeyEndorsement, KeyRetirement, endorse, public_key_id, retire
from shared.manifest import SignedManifest, public_key_b64, sign_manifest
from shared.messages import DesiredState

__all__ = ["KeyStatus", "Retired", "chain", "current_row", "list_keys", "retire_key", "rotate_key"]

logger = logging.getLogger(__name__)

_rotating = threading.Lock()  # one rotation at a time in this process; the primary key guards the rest


@dataclass(frozen=True)
class KeyStatus:
    """A key for `list_keys`: its row, whether it signs now, and how many versions it signed."""

    row: SigningKey
    current: bool
    versions: int

    @property
    def state(self) -> str:
        """Return ``current``, ``retired`` or ``valid`` (trusted, no longer signing)."""
        return "current" if self.current else "retired" if self.row.retired_at is not None else "valid"


@dataclass
class Retired:
    """What `retire_key` did: the key, the versions it re-signed and the desired states it changed."""

    key: SigningKey
    resigned: list[str] = field(default_factory=list)
    states: list[DesiredState] = field(default_factory=list)


def _key_id(private_key: Ed25519PrivateKey) -> str:
    return public_key_id(public_key_b64(private_key))


def current_row(session: Session, settings: HubSettings) -> SigningKey | None:
    """Return the row of the key in the key file; record it as the first key when there is none.

    None when the chain exists and does not hold the file's key (a key file replaced by hand):
    devices would refuse what it signs, and `list_keys` says so.
    """
    key = load_or_create_signing_key(settings.signing_key)
    kid = _key_id(key)
    row = session.get(SigningKey, kid)
    if row is not None:
        return row
    if session.exec(select(SigningKey).limit(1)).first() is not None:
        logger.warning("the signing key file %s holds key %s, which is not in the key chain", settings.signing_key, kid)
        return None
    row = SigningKey(key_id=kid, public_key=public_key_b64(key), created_by="first key")
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # another replica recorded it first
        session.rollback()
        return session.get(SigningKey, kid)
    return row


def chain(session: Session, settings: HubSettings) -> KeyChain:
    """Return what devices follow: the current key and every endorsement and retirement, oldest first."""
    current_row(session, settings)
    key = load_or_create_signing_key(settings.signing_key)
    rows = list(session.exec(select(SigningKey).order_by(col(SigningKey.created_at))))
    return KeyChain(
        current=_key_id(key),
        current_public_key=public_key_b64(key),
        endorsements=[KeyEndorsement.model_validate(r.endorsement) for r in rows if r.endorsement],
        retirements=[
            KeyRetirement.model_validate(r.retirement)
            for r in sorted(rows, key=lambda r: r.retired_at or utcnow())
            if r.retirement
        ],
    )


def _signed_by(signed_manifest: str) -> str:
    return SignedManifest.model_validate_json(signed_manifest).key_id


def list_keys(session: Session, settings: HubSettings) -> list[KeyStatus]:
    """Return every key of the chain, oldest first, with its state and how many versions it signed."""
    current = current_row(session, settings)
    counts: dict[str, int] = {}
    for signed in session.exec(select(ModelVersion.signed_manifest)):
        kid = _signed_by(signed)
        counts[kid] = counts.get(kid, 0) + 1
    rows = session.exec(select(SigningKey).order_by(col(SigningKey.created_at)))
    return [KeyStatus(r, current is not None and r.key_id == current.key_id, counts.get(r.key_id, 0)) for r in rows]


def _write_private(path: Path, key: Ed25519PrivateKey) -> Path:
    """Write a key beside `path` (mode 0600) and return the temporary path; the caller renames it."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f"{path.name}.{_key_id(key)}.new")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise ConflictError(f"cannot write the new signing key beside {path}: {exc}") from exc
    return tmp


def rotate_key(session: Session, settings: HubSettings, *, actor: str) -> SigningKey:
    """Make a new signing key chained to the current one; it signs every manifest from now on."""
    with _rotating:
        previous = load_or_create_signing_key(settings.signing_key)
        if current_row(session, settings) is None:
            raise ConflictError(
                f"the signing key file {settings.signing_key} holds key {_key_id(previous)}, which is not in the "
                "key chain: devices would not follow a rotation from it; put the current key's file back"
            )
        new = Ed25519PrivateKey.generate()
        endorsement = endorse(previous, new)
        tmp = _write_private(settings.signing_key, new)
        try:
            row = SigningKey(
                key_id=endorsement.key_id,
                public_key=endorsement.public_key,
                previous_key_id=endorsement.previous_key_id,
                endorsement=endorsement.model_dump(mode="json"),
                created_at=endorsement.created_at,
                created_by=actor,
            )
            session.add(row)
            record(session, actor, "signing_key.rotate", f"signing_key:{row.key_id}", previous=row.previous_key_id)
            session.commit()
            # Recorded first: a key file whose key is not in the chain would sign what devices refuse.
            os.replace(tmp, settings.signing_key)
        finally:
            tmp.unlink(missing_ok=True)
    logger.info("signing key rotated: %s succeeds %s", row.key_id, row.previous_key_id)
    return row


def retire_key(
    session: Session,
    settings: HubSettings,
    key_id: str,
    *,
    actor: str,
    messaging: DesiredPublisher | None = None,
) -> Retired:
    """Retire a key: re-sign what it signed with the current key, update desired states, refuse it from now on."""
    current = load_or_create_signing_key(settings.signing_key)
    if key_id == _key_id(current):
        raise ConflictError(
            f"key {key_id} signs new manifests; rotate first (`autodl-hub signing-key rotate`), then retire it"
        )
    row = session.get(SigningKey, key_id)
    if row is None:
        raise NotFoundError(f"no signing key {key_id}")
    if row.retired_at is not None:
        return Retired(row)
    statement = retire(current, key_id)
    row.retired_at, row.retirement = statement.retired_at, statement.model_dump(mode="json")
    session.add(row)
    result = Retired(row)
    new_sha: dict[tuple[str, str], str] = {}
    for version, model in session.exec(select(ModelVersion, Model).where(ModelVersion.model_id == Model.id)):
        signed = SignedManifest.model_validate_json(version.signed_manifest)
        if signed.key_id != key_id:
            continue
        raw = sign_manifest(signed.manifest, current).to_bytes()
        version.signed_manifest, version.manifest_sha256 = raw.decode(), hashlib.sha256(raw).hexdigest()
        session.add(version)
        new_sha[(model.name, version.version)] = version.manifest_sha256
        result.resigned.append(f"{model.name}@{version.version}")
    if new_sha:
        session.flush()
        for device in list(session.exec(select(Device).where(col(Device.decommissioned).is_(False)))):
            models = (device.desired or {}).get("models") or {}
            changes = {}
            for name, entry in models.items():
                sha = new_sha.get((name, entry.get("version")))
                if sha is not None and entry.get("manifest_sha256") != sha:
                    changes[name] = (
                        DesiredState.model_validate(device.desired)
                        .models[name]
                        .model_copy(update={"manifest_sha256": sha})
                    )
            if changes:
                result.states.append(stage_desired(session, device.id, changes, actor=actor))
    record(
        session,
        actor,
        "signing_key.retire",
        f"signing_key:{key_id}",
        resigned=len(result.resigned),
        devices=len(result.states),
    )
    session.commit()
    if messaging is not None:
        for state in result.states:
            messaging.publish_desired(state)
    logger.info("signing key %s retired: %d versions re-signed", key_id, len(result.resigned))
    return result
