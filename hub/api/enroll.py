"""Enrollment: an enrollment token and device facts in, the device's own credentials out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from hub.api.deps import BrokerDep, SettingsDep, client_address
from hub.db import SessionDep
from hub.fleet import devices
from hub.security import RateLimiter
from shared import routes
from shared.messages import EnrollRequest, EnrollResponse

router = APIRouter(tags=["enrollment"])


@router.post(routes.ENROLL, responses={401: {"description": "the token is unknown, expired, revoked or used up"}})
async def enroll(
    body: EnrollRequest, request: Request, session: SessionDep, settings: SettingsDep, broker: BrokerDep
) -> EnrollResponse:
    """Enroll a device; the answer holds its credentials and the hub's signing key."""
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.hit(f"enroll:{client_address(request)}", *settings.enroll_rate)
    # The broker round trip blocks; keep it off the event loop.
    return await run_in_threadpool(devices.enroll, session, settings, body, broker)
