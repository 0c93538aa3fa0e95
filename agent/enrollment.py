"""Enroll this device with a hub: pin its CA, profile the device, POST /enroll, store the identity (0600).

Over HTTPS the hub is trusted through ``--ca-hash`` (its CA is fetched and must match,
`agent.tls.fetch_pinned_ca`), ``--ca-file``, or the system's store; the token goes out only
on a connection verified that way. Plain HTTP goes only to loopback, or with ``--insecure``.
"""

from __future__ import annotations

import logging
import ssl
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from agent import __version__
from agent.config import AgentSettings, Identity, save_identity
from agent.device import detect_profile
from agent.errors import AlreadyEnrolledError, EnrollmentError, HubUnavailableError
from agent.tls import DeviceKey, fetch_pinned_ca, save_device_certificate, save_pinned_ca, ssl_context
from shared import routes
from shared.messages import EnrollRequest, EnrollResponse
from shared.targets import DeviceProfile
from shared.tls import TrustError, is_loopback, parse_ca_hash

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
    ca_hash: str | None = None,
    device_cert: bool = False,
    *,
    client: httpx.Client | None = None,
    profile: DeviceProfile | None = None,
) -> Identity:
    """Enroll with the hub and save the identity; refuse when enrolled unless `force`.

    `device_cert`: make a key pair here and have the hub certify it, for MQTT over mutual TLS.
    `client` (its connections reused, its own TLS verification) and `profile` (detected once)
    serve a process that enrolls many simulated devices (bench/fleet.py).
    """
    if settings.identity_path.exists() and not force:
        raise AlreadyEnrolledError(
            f"already enrolled (identity in {settings.identity_path}); nothing changed. Use --force to enroll again"
        )
    verify, ca_pem = _trust(settings, hub_url, ca_hash, transport)
    if device_cert and verify is False:
        raise EnrollmentError("--device-cert needs an https:// hub: the certificate is for MQTT over TLS")
    key = DeviceKey() if device_cert else None
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    request = EnrollRequest(
        token=token,
        name=name,
        labels=labels or {},
        profile=profile or detect_profile(settings.state_dir),
        agent_version=__version__,
        csr=key.csr_pem() if key is not None else None,
    )
    url = routes.url(hub_url, routes.ENROLL)
    # Unset optional fields stay out, so a hub that predates them still takes the request.
    body, headers = request.model_dump_json(exclude_none=True), {"Content-Type": "application/json"}
    try:
        if client is not None:
            response = client.post(url, content=body, headers=headers)
        else:
            with httpx.Client(timeout=settings.http_timeout_s, transport=transport, verify=verify) as own:
                response = own.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        if _certificate_refused(exc):
            raise EnrollmentError(
                f"the hub at {hub_url} presented a certificate that does not chain to the trusted CA"
                f"{' (pinned by --ca-hash)' if ca_hash else ''}: {exc}. Nothing was sent"
            ) from exc
        raise HubUnavailableError(f"cannot reach the hub at {url}: {exc}") from exc
    if response.status_code >= 500:
        raise HubUnavailableError(f"the hub answered HTTP {response.status_code} to enrollment")
    if response.status_code >= 400:
        raise EnrollmentError(f"the hub refused enrollment (HTTP {response.status_code}): {_detail(response)}")
    try:
        answer = EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise EnrollmentError(f"the hub's enrollment answer is invalid: {exc}") from exc
    if not answer.mqtt_tls and not is_loopback(answer.mqtt_host) and not settings.insecure:
        raise EnrollmentError(
            f"the hub registered this device as {answer.device_id} but tells it to use plain MQTT to "
            f"{answer.mqtt_host}; nothing was stored. Enroll with --insecure to accept that "
            "(and decommission that device id at the hub)"
        )
    if key is not None and answer.device_certificate is None:
        raise EnrollmentError(f"the hub registered {answer.device_id} but issued no device certificate")
    identity = Identity.from_response(answer, name)
    save_pinned_ca(settings, ca_pem)  # before the identity, which is what makes the device enrolled
    save_device_certificate(settings, key, answer.device_certificate)
    path = save_identity(settings, identity)
    logger.info("enrolled as %s; identity in %s", identity.device_id, path)
    return identity


def _trust(
    settings: AgentSettings, hub_url: str, ca_hash: str | None, transport: httpx.BaseTransport | None
) -> tuple[ssl.SSLContext | bool, str | None]:
    """Return how to verify the hub (a context, or False for plain HTTP) and the CA PEM to keep."""
    url = urlsplit(hub_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise EnrollmentError(f"hub URL {hub_url!r}: use https://host:port (or http:// on loopback)")
    if url.scheme == "http":
        if ca_hash is not None:
            raise EnrollmentError(f"--ca-hash pins a TLS certificate, but {hub_url} is plain HTTP: use https://")
        if not is_loopback(url.hostname) and not settings.insecure:
            raise EnrollmentError(
                f"{hub_url} is plain HTTP beyond loopback: the token and credentials would cross the network "
                "in clear. Use https:// with --ca-hash (as `autodl-hub token create` prints), or --insecure"
            )
        return False, None
    if ca_hash is None:
        if settings.ca_file is None:
            return ssl.create_default_context(), None  # the system's store: a publicly trusted hub
        try:
            pem = settings.ca_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise EnrollmentError(f"cannot read the CA file {settings.ca_file}: {exc}") from exc
        return ssl_context(settings, pem), pem
    if settings.ca_file is not None:
        raise EnrollmentError("give --ca-hash or --ca-file, not both")
    try:
        pin = parse_ca_hash(ca_hash)
    except TrustError as exc:
        raise EnrollmentError(str(exc)) from exc
    pem = fetch_pinned_ca(hub_url, pin, settings.http_timeout_s, transport)
    return ssl_context(settings, pem), pem


def _certificate_refused(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:200]
    return str(body)[:200]
