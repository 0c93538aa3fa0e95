"""Enrollment: the CA to pin, then an enrollment token and device facts in, the device's own credentials out."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from hub.api.deps import BrokerDep, SettingsDep, client_address
from hub.db import SessionDep
from hub.errors import NotFoundError
from hub.fleet import devices
from hub.security import RateLimiter
from hub.tls import ca_pem
from shared import routes
from shared.messages import EnrollRequest, EnrollResponse

router = APIRouter(tags=["enrollment"])


@router.get(routes.CA, responses={404: {"description": "the hub has no CA of its own to pin"}})
def certificate_authority(settings: SettingsDep) -> Response:
    """Return the CA certificate (PEM) agents pin by its hash (``--ca-hash``); public, as certificates are."""
    pem = ca_pem(settings)
    if pem is None:
        raise NotFoundError("this hub has no CA to pin: its certificate is trusted through the system's store")
    return Response(pem, media_type="application/x-pem-file")


@router.post(
    routes.ENROLL,
    responses={401: {"description": "the token is unknown, expired, revoked or used up"}},
    # No "device_certificate": null for agents that predate it (their answer model forbids unknown fields).
    response_model_exclude_none=True,
)
async def enroll(
    body: EnrollRequest, request: Request, session: SessionDep, settings: SettingsDep, broker: BrokerDep
) -> EnrollResponse:
    """Enroll a device; the answer holds its credentials and the hub's signing key."""
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.hit(f"enroll:{client_address(request)}", *settings.enroll_rate)
    # The broker round trip blocks; keep it off the event loop.
    return await run_in_threadpool(devices.enroll, session, settings, body, broker)
