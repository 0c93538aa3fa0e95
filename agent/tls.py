"""Whom the agent trusts for HTTPS and MQTT over TLS, and the pinned first contact with a hub.

Trust, in order: ``ca_file`` (a CA from elsewhere), else the CA pinned at enrollment
(``<state_dir>/ca.pem``), else the system's store. `fetch_pinned_ca` is the one
unverified request the agent ever makes: it reads the hub's CA certificate and keeps it
only when the certificate's key matches the ``--ca-hash`` the operator gave
(`shared.trust.ca_hash`); every later connection verifies against it.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from agent.config import AgentSettings
from agent.errors import EnrollmentError, FatalError, HubUnavailableError
from shared import routes
from shared.trust import TrustError, ca_hash

__all__ = ["PINNED_CA_FILE", "ca_file", "fetch_pinned_ca", "save_pinned_ca", "ssl_context"]

PINNED_CA_FILE = "ca.pem"


def ca_file(settings: AgentSettings) -> Path | None:
    """Return the CA file the agent verifies the hub and broker with; None: the system's store."""
    if settings.ca_file is not None:
        return settings.ca_file
    pinned = settings.state_dir / PINNED_CA_FILE
    return pinned if pinned.exists() else None


def ssl_context(settings: AgentSettings, cadata: str | None = None) -> ssl.SSLContext:
    """Return a verifying client context: `cadata` (PEM) when given, else `ca_file`'s trust."""
    if cadata is not None:
        return ssl.create_default_context(cadata=cadata)
    path = ca_file(settings)
    try:
        return ssl.create_default_context(cafile=str(path) if path is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise FatalError(f"cannot read the CA file {path}: {exc}") from exc


def fetch_pinned_ca(hub_url: str, pin: str, timeout: float, transport: httpx.BaseTransport | None = None) -> str:
    """Fetch the hub's CA (PEM) without verifying TLS and return it only if its key hashes to `pin`."""
    url = routes.url(hub_url, routes.CA)
    try:
        with httpx.Client(timeout=timeout, verify=False, transport=transport) as client:  # noqa: S501 - pinned below
            response = client.get(url)
    except httpx.HTTPError as exc:
        raise HubUnavailableError(f"cannot reach the hub at {url}: {exc}") from exc
    if response.status_code != 200:
        raise EnrollmentError(
            f"the hub answered HTTP {response.status_code} for its CA at {url}: it has no CA to pin "
            "(use --ca-file, or no --ca-hash for a publicly trusted certificate)"
        )
    try:
        found = ca_hash(response.content)
        pem = response.content.decode("ascii")
        ssl.create_default_context(cadata=pem)  # a certificate the TLS library can use, too
    except (TrustError, UnicodeDecodeError, ssl.SSLError) as exc:
        raise EnrollmentError(f"the hub's CA at {url} is not a certificate: {exc}") from exc
    if found != pin:
        raise EnrollmentError(
            f"the hub's CA does not match --ca-hash: expected {pin}, the hub at {hub_url} has {found}. "
            "Nothing was sent or stored: this is another hub, or someone between you and it"
        )
    return pem


def save_pinned_ca(settings: AgentSettings, pem: str | None) -> None:
    """Keep the CA trusted at enrollment in the state dir (0600); None removes an older one."""
    path = settings.state_dir / PINNED_CA_FILE
    if pem is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pem)
    os.replace(tmp, path)
