"""Limits applied before the hub does any work for a request: body size, body time, who may upload.

`RequestLimits` is the outermost ASGI middleware. Per route it picks a body limit: KBs
for JSON and forms (`max_json_bytes`; `max_enroll_bytes` for ``POST /enroll``, the one
unauthenticated write), and `max_upload_bytes` only for the upload routes, and only once
the bearer token is known to be an operator's: an anonymous upload is answered 401
before one byte of its body is read (so nothing is parsed or spooled to disk). A declared
``Content-Length`` over the limit is refused at once with 413; a chunked body is counted
as it arrives and refused the moment it passes the limit. A body that stalls longer than
`body_timeout_s` between chunks is answered 408. Error answers never echo the body.

`HeaderTimeoutH11Protocol` is uvicorn's h11 protocol with a deadline for the request
line and headers (uvicorn itself waits forever for them: one slow client per socket).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from hub.errors import HubError, PermissionDeniedError
from hub.models import Role
from hub.security import authenticate

__all__ = [
    "CAPTURE_ROUTE",
    "UPLOAD_ROUTES",
    "HeaderTimeoutH11Protocol",
    "RequestLimits",
    "capture_authorizer",
    "upload_authorizer",
]

# POST routes whose body is an operator's multipart upload: model files, a dataset's label file.
UPLOAD_ROUTES = (re.compile(r"^/models/[^/]+/versions/?$"), re.compile(r"^/datasets/[^/]+/import/?$"))
# POST route of a device's captured items: up to `max_capture_bytes`, once its own device token is seen.
CAPTURE_ROUTE = re.compile(r"^/devices/([^/]+)/captures/?$")
_ENROLL = "/enroll"


def _is_upload(scope: Scope) -> bool:
    return scope.get("method") == "POST" and any(p.match(scope.get("path", "")) for p in UPLOAD_ROUTES)


def _capture_device(scope: Scope) -> str | None:
    match = CAPTURE_ROUTE.match(scope.get("path", "")) if scope.get("method") == "POST" else None
    return match.group(1) if match else None


class RequestLimits:
    """Body size and time limits per route, and authentication before an upload's body is read."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_json_bytes: int,
        max_enroll_bytes: int,
        max_upload_bytes: int,
        body_timeout_s: float,
        authorize_upload: Callable[[str], None] | None = None,
        max_capture_bytes: int = 16 * 1024 * 1024,
        authorize_capture: Callable[[str, str], None] | None = None,
    ) -> None:
        self.app = app
        self.max_capture_bytes = max_capture_bytes
        # Raises a HubError unless the bearer token is the named device's own (DB, worker thread).
        self.authorize_capture = authorize_capture
        self.max_json_bytes = max_json_bytes
        self.max_enroll_bytes = max_enroll_bytes
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout_s = body_timeout_s
        # Raises a HubError unless the bearer token may upload; runs in a worker thread (DB).
        self.authorize_upload = authorize_upload

    def limit_for(self, scope: Scope) -> int:
        """Return the body limit of this request's route."""
        if _is_upload(scope):
            return self.max_upload_bytes
        if _capture_device(scope) is not None:
            return self.max_capture_bytes
        if scope.get("path") == _ENROLL:
            return self.max_enroll_bytes
        return self.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, f"request body larger than this route's limit of {limit} bytes")
            return
        device = _capture_device(scope)
        check: Callable[[str], None] | None = None
        if _is_upload(scope):
            check = self.authorize_upload
        elif device is not None and self.authorize_capture is not None:
            authorize_capture = self.authorize_capture
            check = lambda credential: authorize_capture(credential, device)  # noqa: E731
        if check is not None:
            token = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, credential = token.partition(" ")
            try:
                if scheme.lower() != "bearer" or not credential.strip():
                    raise _Unauthenticated
                await run_in_threadpool(check, credential.strip())
            except _Unauthenticated:
                await _answer(send, 401, "send Authorization: Bearer <API key>", bearer=True)
                return
            except HubError as exc:
                await _answer(send, exc.status, exc.message, bearer=exc.status == 401)
                return
        seen = 0
        body_done = False
        started = answered = False

        async def refuse(status: int, detail: str) -> Message:
            # Answered here, not by raising: the framework would turn an exception raised while
            # it reads the body into its own 400. The app is told the client left.
            nonlocal answered
            if not started and not answered:
                answered = True
                await _answer(send, status, detail)
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if answered:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # waiting for the disconnect: no deadline
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                return await refuse(408, f"no request body data for {self.body_timeout_s:g}s")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    return await refuse(413, f"request body larger than this route's limit of {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the limit's answer went out already
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


class _Unauthenticated(Exception):
    pass


async def _answer(send: Send, status: int, detail: str, *, bearer: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b"Bearer"))
    # The body was not read (or not all of it): the connection cannot be reused.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def upload_authorizer(session_factory: Callable[[], Any]) -> Callable[[str], None]:
    """Return a check that a bearer token is an API key with the operator role (raises HubError)."""

    def authorize(token: str) -> None:
        with session_factory() as session:
            authenticate(session, token).require(Role.OPERATOR)

    return authorize


def capture_authorizer(session_factory: Callable[[], Any]) -> Callable[[str, str], None]:
    """Return a check that a bearer token is the device token of `device_id` (raises HubError)."""

    def authorize(token: str, device_id: str) -> None:
        with session_factory() as session:
            principal = authenticate(session, token)
        if principal.kind != "device" or principal.id != device_id:
            raise PermissionDeniedError("a device uploads only its own captured items, with its device token")

    return authorize


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request line and headers take too long."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self._header_deadline is None and self._waiting_for_headers():
            self._arm_header_deadline()
        super().data_received(data)
        if self._header_deadline is not None and not self._waiting_for_headers():
            self._header_deadline.cancel()  # the head is complete: the body has its own deadline
            self._header_deadline = None

    def _waiting_for_headers(self) -> bool:
        cycle = self.cycle
        return cycle is None or bool(cycle.response_complete)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %ss", self.header_timeout_s)
            self.transport.close()

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutH11Protocol]:
        """Return this protocol class with a request-head deadline of `seconds`."""
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds})

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)
