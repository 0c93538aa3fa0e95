"""Dependencies shared by the routers: settings, credentials with roles, messaging handles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Protocol

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hub.api.schemas import ID_PATTERN
from hub.config import HubSettings, parse_rate_limit
from hub.db import SessionDep
from hub.errors import AuthenticationError
from hub.fleet.commands import CommandPublisher
from hub.fleet.devices import BrokerCredentials, DesiredPublisher, RetainedCleaner
from hub.models import Role
from hub.security import Principal, RateLimiter, authenticate
from shared.messages import Release

__all__ = [
    "Admin",
    "BrokerDep",
    "Caller",
    "DeviceIdPath",
    "Messaging",
    "MessagingDep",
    "ModelNamePath",
    "Operator",
    "SettingsDep",
    "Viewer",
    "client_address",
]

_bearer = HTTPBearer(auto_error=False, description="an API key (adk_...) or a device token (adt_...)")

DeviceIdPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=128)]
ModelNamePath = Annotated[str, Path(pattern=ID_PATTERN, max_length=128)]


# The small dependencies are coroutines: FastAPI runs a plain function in the thread pool,
# a hop that costs more than the function (several per request).
async def _settings(request: Request) -> HubSettings:
    settings: HubSettings = request.app.state.settings
    return settings


class Messaging(DesiredPublisher, RetainedCleaner, CommandPublisher, Protocol):
    """What the routers need of `hub.messaging.session.HubMessaging` (None: a hub without MQTT)."""

    def publish_release(self, release: Release) -> object: ...


async def _messaging(request: Request) -> Messaging | None:
    messaging: Messaging | None = request.app.state.messaging
    return messaging


async def _broker(request: Request) -> BrokerCredentials | None:
    broker: BrokerCredentials | None = request.app.state.broker_admin
    return broker


SettingsDep = Annotated[HubSettings, Depends(_settings)]
MessagingDep = Annotated[Messaging | None, Depends(_messaging)]
BrokerDep = Annotated[BrokerCredentials | None, Depends(_broker)]


def client_address(request: Request) -> str:
    """Return the caller's address (for limits on unauthenticated endpoints).

    uvicorn puts the X-Forwarded-For address here only when the peer is one of the
    `trusted_proxies` (hub.serve); from anyone else the header is ignored.
    """
    return request.client.host if request.client is not None else "unknown"


def _principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise AuthenticationError("send Authorization: Bearer <API key or device token>")
    principal = authenticate(session, credentials.credentials)
    limiter: RateLimiter = request.app.state.rate_limiter
    if principal.kind == "key":
        limit, period = parse_rate_limit(principal.rate_limit) if principal.rate_limit else settings.api_rate
        limiter.hit(f"key:{principal.id}", limit, period)
    else:
        # Devices get a budget too: one device's token must not be a way around the limits.
        limiter.hit(f"device:{principal.id}", *settings.device_rate)
    request.state.principal = principal
    return principal


def _require(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        principal.require(role)
        return principal

    return check


Caller = Annotated[Principal, Depends(_principal)]
Viewer = Annotated[Principal, Depends(_require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(_require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(_require(Role.ADMIN))]
