"""Dashboard sign-in: an API key in an HttpOnly cookie, roles from `hub.security`, CSRF tokens for forms.

The cookie holds the API key itself (HttpOnly, SameSite=Strict, path /ui), so revoking
the key in the hub ends every dashboard session at once. Each form carries a CSRF token
derived from the key by HMAC: only a page served to the key's holder can know it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlmodel import Session

from hub.config import HubSettings, parse_rate_limit
from hub.db import SessionDep
from hub.errors import AuthenticationError, PermissionDeniedError
from hub.models import Role
from hub.security import Principal, RateLimiter, authenticate, role_allows

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "NotSignedIn",
    "UiCaller",
    "UiUser",
    "check_csrf",
    "clear_session",
    "csrf_token",
    "sign_in",
    "start_session",
]

COOKIE = "autodl_session"
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


def csrf_token(key: str) -> str:
    """Return the CSRF token of the session holding API key `key`."""
    return hmac.new(key.encode(), b"autodl-ui-csrf-v1", hashlib.sha256).hexdigest()


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


def start_session(request: Request, response: Response, key: str) -> None:
    """Set the session cookie on `response`."""
    response.set_cookie(
        COOKIE,
        key.strip(),
        max_age=_MAX_AGE_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session(response: Response) -> None:
    """Remove the session cookie."""
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")


def _user(request: Request, session: SessionDep) -> UiUser:
    key = request.cookies.get(COOKIE)
    if not key:
        raise NotSignedIn("sign in with an API key")
    try:
        principal = sign_in(session, key)
    except (AuthenticationError, PermissionDeniedError) as exc:
        raise NotSignedIn(str(exc)) from exc
    # The same per-key budget as the REST API: the dashboard is one more client of the key.
    settings: HubSettings = request.app.state.settings
    limiter: RateLimiter = request.app.state.rate_limiter
    limit, period = parse_rate_limit(principal.rate_limit) if principal.rate_limit else settings.api_rate
    limiter.hit(f"key:{principal.id}", limit, period)
    request.state.principal = principal
    return UiUser(principal, csrf_token(key))


UiCaller = Annotated[UiUser, Depends(_user)]
