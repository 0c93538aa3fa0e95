"""Dashboard sign-in: a server-side session bound to an API key, roles from `hub.security`, CSRF tokens.

Signing in with an API key creates a `UiSession` row: a random session id (the cookie:
HttpOnly, SameSite=Strict, path /ui; only its hash is stored), the key it belongs to, an
expiry and a random CSRF token every form of the session carries. Logout deletes the
row; revoking the key deletes its rows, and every request checks the key anyway. The
sign-in form has its own CSRF token (a double-submit cookie), so no other site can sign
a browser in under a key of its choosing.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy import delete
from sqlmodel import Session, col

from hub.config import HubSettings, parse_rate_limit
from hub.db import SessionDep
from hub.errors import AuthenticationError, PermissionDeniedError
from hub.models import ApiKey, Role, UiSession, utcnow
from hub.security import Principal, RateLimiter, authenticate, hash_secret, role_allows

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "LOGIN_COOKIE",
    "NotSignedIn",
    "UiCaller",
    "UiUser",
    "check_csrf",
    "check_login_csrf",
    "end_session",
    "login_csrf",
    "set_login_csrf",
    "sign_in",
    "start_session",
]

COOKIE = "autodl_session"
LOGIN_COOKIE = "autodl_login"
CSRF_FIELD = "csrf"
_MAX_AGE_S = 12 * 3600


class NotSignedIn(AuthenticationError):
    """No usable session cookie: pages redirect to the sign-in form."""


@dataclass(frozen=True)
class UiUser:
    """The signed-in API key, what it may do and the token its forms must carry."""

    principal: Principal
    csrf: str

    @property
    def role(self) -> Role:
        """Return the key's role."""
        return self.principal.role or Role.VIEWER

    @property
    def can_act(self) -> bool:
        """Return True when the key may change things (operator or admin)."""
        return role_allows(self.role, Role.OPERATOR)

    def require_operator(self) -> None:
        """Raise PermissionDeniedError unless the key is an operator or admin."""
        self.principal.require(Role.OPERATOR)


def check_csrf(user: UiUser, submitted: str | None) -> None:
    """Refuse a form whose CSRF token is missing or not this session's."""
    if not submitted or not hmac.compare_digest(submitted, user.csrf):
        raise PermissionDeniedError("the form's CSRF token is missing or stale; reload the page and try again")


def sign_in(session: Session, key: str) -> Principal:
    """Return the principal of an API key; device tokens and revoked keys are refused."""
    principal = authenticate(session, key.strip())
    if principal.kind != "key":
        raise AuthenticationError("sign in with an API key, not a device token")
    principal.require(Role.VIEWER)
    return principal


def start_session(db: Session, request: Request, response: Response, principal: Principal) -> None:
    """Create a session for the signed-in key and set its cookie on `response`."""
    now = utcnow()
    # Expired sessions of anyone go as new ones start: the table stays small without a sweeper.
    db.execute(delete(UiSession).where(col(UiSession.expires_at) < now))
    session_id = secrets.token_urlsafe(32)
    db.add(
        UiSession(
            id_hash=hash_secret(session_id),
            api_key_id=int(principal.id),
            csrf=secrets.token_hex(32),
            expires_at=now + timedelta(seconds=_MAX_AGE_S),
        )
    )
    db.commit()
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=_MAX_AGE_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def end_session(db: Session, request: Request, response: Response) -> None:
    """Delete the session behind the request's cookie and remove the cookie."""
    session_id = request.cookies.get(COOKIE)
    if session_id:
        db.execute(delete(UiSession).where(col(UiSession.id_hash) == hash_secret(session_id)))
        db.commit()
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")


def login_csrf(request: Request) -> str:
    """Return the sign-in form's CSRF token: the one in the browser's cookie, or a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_hex(32)


def set_login_csrf(request: Request, response: Response, token: str) -> None:
    """Keep the sign-in form's CSRF token in a cookie only this site's pages can pair with the form."""
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def check_login_csrf(request: Request, submitted: str | None) -> None:
    """Refuse a sign-in whose form token does not match the cookie set with the form."""
    expected = request.cookies.get(LOGIN_COOKIE)
    if not expected or not submitted or not hmac.compare_digest(submitted, expected):
        raise PermissionDeniedError("the sign-in form expired or came from elsewhere; reload it and try again")


def _user(request: Request, db: SessionDep) -> UiUser:
    session_id = request.cookies.get(COOKIE)
    if not session_id:
        raise NotSignedIn("sign in with an API key")
    row = db.get(UiSession, hash_secret(session_id))
    if row is None or row.expires_at <= utcnow():
        raise NotSignedIn("the session ended; sign in again")
    key = db.get(ApiKey, row.api_key_id)
    if key is None or key.revoked:
        raise NotSignedIn("the API key of this session was revoked")
    principal = Principal("key", str(key.id), key.name, Role(key.role), key.rate_limit)
    try:
        principal.require(Role.VIEWER)
    except PermissionDeniedError as exc:
        raise NotSignedIn(str(exc)) from exc
    # The same per-key budget as the REST API: the dashboard is one more client of the key.
    settings: HubSettings = request.app.state.settings
    limiter: RateLimiter = request.app.state.rate_limiter
    limit, period = parse_rate_limit(principal.rate_limit) if principal.rate_limit else settings.api_rate
    limiter.hit(f"key:{principal.id}", limit, period)
    request.state.principal = principal
    return UiUser(principal, row.csrf)


UiCaller = Annotated[UiUser, Depends(_user)]
