"""Credentials: API keys with roles, device tokens, enrollment tokens, rate limits, the signing key.

Every secret is 256 random bits with a prefix that says what it is (``adk_`` API key,
``adt_`` device token, ``aen_`` enrollment token, ``amq_`` MQTT password). Only the
SHA-256 of a secret is stored: with that much entropy a slow password hash buys nothing,
and a plain digest lets a request find its key by an indexed lookup.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import parse_rate_limit
from hub.errors import AuthenticationError, ConflictError, NotFoundError, PermissionDeniedError, RateLimitedError
from hub.models import ApiKey, Device, EnrollmentToken, Role, UiSession, utcnow
from shared.manifest import generate_signing_key, load_private_key, public_key_b64

__all__ = [
    "ClaimedToken",
    "API_KEY_PREFIX",
    "DEVICE_TOKEN_PREFIX",
    "ENROLL_TOKEN_PREFIX",
    "MQTT_PASSWORD_PREFIX",
    "Principal",
    "RateLimiter",
    "authenticate",
    "claim_enrollment_token",
    "create_api_key",
    "create_enrollment_token",
    "hash_secret",
    "load_or_create_signing_key",
    "new_secret",
    "revoke_api_key",
    "revoke_enrollment_token",
    "role_allows",
    "signing_public_key",
]

API_KEY_PREFIX = "adk_"
DEVICE_TOKEN_PREFIX = "adt_"
ENROLL_TOKEN_PREFIX = "aen_"
MQTT_PASSWORD_PREFIX = "amq_"

_TOUCH_INTERVAL = timedelta(minutes=5)
_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def new_secret(prefix: str) -> str:
    """Return a new random secret with a type prefix."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """Return the stored form of a secret (hex SHA-256)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def role_allows(have: Role, need: Role) -> bool:
    """Return True when role `have` includes role `need`."""
    return _RANK[have] >= _RANK[need]


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key (with a role) or a device."""

    kind: Literal["key", "device"]
    id: str
    name: str
    role: Role | None = None
    rate_limit: str | None = None

    @property
    def actor(self) -> str:
        """Return the name audit events record for this caller."""
        return f"key:{self.id}:{self.name}" if self.kind == "key" else f"device:{self.id}"

    def require(self, role: Role) -> None:
        """Raise PermissionDeniedError unless this is an API key with at least `role`."""
        if self.role is None or not role_allows(self.role, role):
            raise PermissionDeniedError(f"this needs the {role.value} role")


def authenticate(session: Session, token: str) -> Principal:
    """Return the principal a bearer token belongs to; raise AuthenticationError otherwise."""
    digest = hash_secret(token)
    if token.startswith(API_KEY_PREFIX):
        key = session.exec(select(ApiKey).where(ApiKey.key_hash == digest)).first()
        if key is not None and not key.revoked:
            _touch(session, key)
            return Principal("key", str(key.id), key.name, Role(key.role), key.rate_limit)
    elif token.startswith(DEVICE_TOKEN_PREFIX):
        device = session.exec(select(Device).where(Device.token_hash == digest)).first()
        if device is not None and not device.decommissioned:
            return Principal("device", device.id, device.name)
    raise AuthenticationError("invalid or revoked credentials")


def _touch(session: Session, key: ApiKey) -> None:
    """Record when a key was last used, at most once per interval (a write per request would not scale)."""
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > _TOUCH_INTERVAL:
        key.last_used_at = now
        session.add(key)
        session.commit()


def create_api_key(
    session: Session, name: str, role: Role, *, actor: str, rate_limit: str | None = None
) -> tuple[ApiKey, str]:
    """Create an API key; return the row and the secret (shown once, never stored)."""
    if rate_limit is not None:
        parse_rate_limit(rate_limit)
    secret = new_secret(API_KEY_PREFIX)
    key = ApiKey(name=name, key_hash=hash_secret(secret), role=role.value, rate_limit=rate_limit, created_by=actor)
    session.add(key)
    session.flush()
    record(session, actor, "api_key.create", f"api_key:{key.id}", name=name, role=role.value)
    session.commit()
    return key, secret


def revoke_api_key(session: Session, key_id: int, *, actor: str) -> ApiKey:
    """Revoke an API key at once."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFoundError(f"no API key {key_id}")
    key.revoked = True
    session.add(key)
    # Its dashboard sessions end with it (the dashboard also checks the key on every request).
    session.execute(delete(UiSession).where(col(UiSession.api_key_id) == key_id))
    record(session, actor, "api_key.revoke", f"api_key:{key_id}")
    session.commit()
    return key


def create_enrollment_token(
    session: Session,
    *,
    actor: str,
    max_uses: int = 1,
    expires_in: timedelta | None = None,
    labels: dict[str, str] | None = None,
    note: str = "",
    device_label_keys: list[str] | None = None,
) -> tuple[EnrollmentToken, str]:
    """Create an enrollment token; return the row and the secret (shown once)."""
    secret = new_secret(ENROLL_TOKEN_PREFIX)
    token = EnrollmentToken(
        token_hash=hash_secret(secret),
        max_uses=max_uses,
        expires_at=utcnow() + expires_in if expires_in is not None else None,
        labels=dict(labels or {}),
        device_label_keys=sorted(set(device_label_keys)) if device_label_keys is not None else None,
        note=note,
        created_by=actor,
    )
    session.add(token)
    session.flush()
    record(session, actor, "enrollment_token.create", f"enrollment_token:{token.id}", max_uses=max_uses)
    session.commit()
    return token, secret


def revoke_enrollment_token(session: Session, token_id: int, *, actor: str) -> EnrollmentToken:
    """Revoke an enrollment token; devices it enrolled keep their own credentials."""
    token = session.get(EnrollmentToken, token_id)
    if token is None:
        raise NotFoundError(f"no enrollment token {token_id}")
    token.revoked = True
    session.add(token)
    record(session, actor, "enrollment_token.revoke", f"enrollment_token:{token_id}")
    session.commit()
    return token


@dataclass(frozen=True)
class ClaimedToken:
    """What enrollment needs of the token it used: its id and the labels it gives or allows."""

    id: int
    labels: dict[str, str]
    device_label_keys: list[str] | None


def claim_enrollment_token(session: Session, secret: str, now: datetime | None = None) -> ClaimedToken:
    """Use up one enrollment of a token, in the caller's transaction.

    Raises AuthenticationError without saying why (unknown, revoked, expired or used up),
    so a caller learns nothing about which tokens exist.
    """
    now = now or utcnow()
    # One conditional UPDATE: two devices racing for the last use cannot both win.
    claimed = session.execute(
        update(EnrollmentToken)
        .where(
            col(EnrollmentToken.token_hash) == hash_secret(secret),
            col(EnrollmentToken.revoked).is_(False),
            col(EnrollmentToken.expires_at).is_(None) | (col(EnrollmentToken.expires_at) > now),
            col(EnrollmentToken.uses) < col(EnrollmentToken.max_uses),
        )
        .values(uses=col(EnrollmentToken.uses) + 1)
        .returning(col(EnrollmentToken.id), col(EnrollmentToken.labels), col(EnrollmentToken.device_label_keys))
    ).first()
    if claimed is None:
        raise AuthenticationError("invalid enrollment token")
    return ClaimedToken(int(claimed[0]), dict(claimed[1] or {}), claimed[2])


class RateLimiter:
    """Token buckets per key: `limit` requests per `period` seconds, refilled continuously.

    In memory, so each hub replica enforces its own share; that bounds abuse without
    a shared store.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys

    def hit(self, key: str, limit: int, period: int, now: float | None = None) -> None:
        """Spend one request of `key`; raise RateLimitedError when its bucket is empty."""
        now = time.monotonic() if now is None else now
        rate = limit / period
        with self._lock:
            tokens, last = self._buckets.get(key, (float(limit), now))
            tokens = min(float(limit), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                retry_after = max(1, math.ceil((1.0 - tokens) / rate))
                raise RateLimitedError(f"rate limit of {limit} per {period}s exceeded", retry_after)
            if len(self._buckets) >= self._max_keys and key not in self._buckets:
                self._buckets.clear()  # a flood of distinct keys must not grow memory without end
            self._buckets[key] = (tokens - 1.0, now)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the hub's Ed25519 manifest-signing key, creating it (mode 0600) if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = generate_signing_key()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            os.link(tmp, path)  # fails if another process created the key meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        return load_private_key(path.read_bytes())
    except ValueError as exc:
        raise ConflictError(f"signing key {path} is not a usable Ed25519 PEM key: {exc}") from exc


def signing_public_key(path: Path) -> str:
    """Return the base64 raw public key agents receive at enrollment."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return public_key_b64(load_or_create_signing_key(path))
    return _public_key_of(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _public_key_of(path: Path, _mtime_ns: int, _size: int) -> str:
    # Keyed on the file's mtime and size too, so a replaced key file is read again.
    return public_key_b64(load_or_create_signing_key(path))
