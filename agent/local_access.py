"""Who may use the agent's local API: an optional bearer token, and Host checks on loopback.

The API listens on loopback by default (`AgentSettings.host`); packaging that must reach
it from elsewhere (the container image, the K3s DaemonSet) opens it on purpose. There a
bearer token (``AUTODL_AGENT_API_TOKEN``) keeps other processes out. On loopback, a
request whose ``Host`` is not a loopback name is refused, so a web page cannot reach the
API through DNS rebinding. Health probes stay open: kubelet sends no token.
"""

from __future__ import annotations

import secrets
from http import HTTPStatus

from agent.http_messages import Deferred, HttpError, Request, Response, Streaming
from agent.routing import Handler, Router

__all__ = ["OPEN_PATHS", "GuardedRouter", "refusal"]

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/healthz", "/readyz"})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8500
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(
    token: str | None, bind_host: str, path: str, host: str | None, authorization: str | None
) -> tuple[HTTPStatus, str] | None:
    """Return (status, reason) when the request may not be served, else None."""
    if path in OPEN_PATHS:
        return None  # probes: kubelet sends no token and names the pod's address as Host
    if bind_host in _LOOPBACK and host is not None and _host_name(host) not in _LOOPBACK:
        return HTTPStatus.MISDIRECTED_REQUEST, "this API answers loopback host names only"
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            return HTTPStatus.UNAUTHORIZED, "send Authorization: Bearer <the agent's API token>"
    return None


class GuardedRouter(Router):
    """The API's route table, each handler behind `refusal` (the one place the local API checks access)."""

    def __init__(self, token: str | None, bind_host: str) -> None:
        super().__init__()
        self.token = token
        self.bind_host = bind_host

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """Return the route's handler, wrapped so it first checks the caller."""
        handler, params = super().match(method, path)

        def guarded(request: Request) -> Response | Streaming | Deferred:
            headers = request.headers  # lower-case names (agent.http)
            refused = refusal(
                self.token, self.bind_host, request.path, headers.get("host"), headers.get("authorization")
            )
            if refused is not None:
                status, reason = refused
                extra = (("WWW-Authenticate", "Bearer"),) if status == HTTPStatus.UNAUTHORIZED else ()
                raise HttpError(status, reason, "unauthorized" if extra else "misdirected", extra)
            return handler(request)

        return guarded, params
