"""Enroll this device with a hub: profile it, POST /enroll, store the identity (0600)."""

from __future__ import annotations

import logging

import httpx
from pydantic import ValidationError

from agent import __version__
from agent.config import AgentSettings, Identity, save_identity
from agent.device import detect_profile
from agent.errors import AlreadyEnrolledError, EnrollmentError, HubUnavailableError
from shared import routes
from shared.messages import EnrollRequest, EnrollResponse
from shared.targets import DeviceProfile

__all__ = ["enroll"]

logger = logging.getLogger(__name__)


def enroll(
    settings: AgentSettings,
    hub_url: str,
    token: str,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    force: bool = False,
    transport: httpx.BaseTransport | None = None,
    *,
    client: httpx.Client | None = None,
    profile: DeviceProfile | None = None,
) -> Identity:
    """Enroll with the hub and save the identity; refuse when enrolled unless `force`.

    `client` (its connections reused) and `profile` (detected once) serve a process that
    enrolls many simulated devices (bench/fleet.py).
    """
    if settings.identity_path.exists() and not force:
        raise AlreadyEnrolledError(
            f"already enrolled (identity in {settings.identity_path}); nothing changed. Use --force to enroll again"
        )
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    request = EnrollRequest(
        token=token,
        name=name,
        labels=labels or {},
        profile=profile or detect_profile(settings.state_dir),
        agent_version=__version__,
    )
    url = routes.url(hub_url, routes.ENROLL)
    body, headers = request.model_dump_json(), {"Content-Type": "application/json"}
    try:
        if client is not None:
            response = client.post(url, content=body, headers=headers)
        else:
            with httpx.Client(timeout=settings.http_timeout_s, transport=transport) as own:
                response = own.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise HubUnavailableError(f"cannot reach the hub at {url}: {exc}") from exc
    if response.status_code >= 500:
        raise HubUnavailableError(f"the hub answered HTTP {response.status_code} to enrollment")
    if response.status_code >= 400:
        raise EnrollmentError(f"the hub refused enrollment (HTTP {response.status_code}): {_detail(response)}")
    try:
        answer = EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise EnrollmentError(f"the hub's enrollment answer is invalid: {exc}") from exc
    identity = Identity.from_response(answer, name)
    path = save_identity(settings, identity)
    logger.info("enrolled as %s; identity in %s", identity.device_id, path)
    return identity


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:200]
    return str(body)[:200]
