"""HTTP/1.1 messages of the agent's server: requests, answers, errors, and the strict head parser.

A head is refused (`Refused`: answered, then the connection closed) unless its request
line and header lines are well formed, it has no Transfer-Encoding, and at most one
Content-Length that is a plain non-negative integer within the body limit: the end of
a request is then never in doubt, so nothing can be smuggled past it.
"""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

from agent.errors import AgentError

__all__ = [
    "Deferred",
    "HttpError",
    "Refused",
    "Request",
    "Response",
    "Streaming",
    "encode",
    "parse_head",
    "phrase",
]

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TOKEN_TEXT = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


class HttpError(AgentError):
    """An answer other than 200, with the reason counted in /metrics."""

    def __init__(
        self, status: HTTPStatus, message: str, reason: str = "bad_request", headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers


@dataclass
class Request:
    """One parsed request; `params` holds the route's ``{name}`` parts."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes | bytearray = b""
    params: dict[str, str] = field(default_factory=dict)
    sock: socket.socket | None = field(default=None, repr=False)

    def disconnected(self) -> bool:
        """Return True when the client has closed its side (for long streaming answers)."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


@dataclass
class Response:
    """A complete answer; `after` runs once it is written, before the connection reads its next request."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    after: Callable[[], None] | None = None  # work off the answer's latency (hard-example capture)


@dataclass
class Streaming:
    """An answer written chunk by chunk (chunked transfer coding) as `chunks` yields them."""

    chunks: Iterator[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass
class Deferred:
    """An answer made and written on a thread of its own: the request's worker is free at once.

    Only for long work that a limit of its own bounds (text generation: a model's sequences
    in flight and its queue, which the handler took a place in before returning this), so
    a generation never holds one of the server's workers and the model's limit, not the
    worker pool, decides which generation requests are refused. `run` returns the answer
    (a `Streaming` one is written for as long as the client stays); an exception is a 500.
    `cancel` gives back what the handler took when no thread can be had to run it.
    """

    run: Callable[[], Response | Streaming]
    cancel: Callable[[], None] = lambda: None


class Refused(AgentError):
    """The connection's bytes are not an acceptable request: answer and close."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(str(error))
        self.error = error


def parse_head(raw: bytes, max_body: int) -> tuple[Request, int]:
    """Parse a request head; return it and its body's length, or raise Refused (answer, then close).

    A well-formed head is read in one pass over its text; anything unusual (a malformed line,
    Transfer-Encoding, a repeated or odd Content-Length) goes to the strict reading, which
    says what is wrong, or accepts what it may.
    """
    text = raw.decode("latin-1")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) == 3 and parts[2] in _VERSIONS and _TOKEN_TEXT.fullmatch(parts[0]) is not None:
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            key = name.lower()
            if not sep or _TOKEN_TEXT.fullmatch(name) is None or (key == "content-length" and key in headers):
                break
            headers[key] = value.strip(" \t")
        else:
            length = headers.get("content-length", "0")
            if "transfer-encoding" not in headers and length.isascii() and length.isdigit() and len(length) <= 18:
                need = int(length)
                if need <= max_body:
                    path, _, query = parts[1].partition("?")
                    return Request(parts[0], path, query, parts[2], headers), need
    return _parse_head_strictly(raw, max_body)


def _parse_head_strictly(raw: bytes, max_body: int) -> tuple[Request, int]:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refused(HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0][:80]!r}", "request_line"))
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise Refused(HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}", "header"))
        key = name.decode("ascii").lower()
        text = value.strip(b" \t")
        if key == "content-length":
            lengths.add(text)
        headers[key] = text.decode("latin-1")
    if "transfer-encoding" in headers:
        raise Refused(
            HttpError(
                HTTPStatus.LENGTH_REQUIRED,
                f"Transfer-Encoding {headers['transfer-encoding']!r} is not accepted; send a Content-Length",
                "transfer_encoding",
            )
        )
    need = 0
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit() or len(value) > 18:
            shown = b", ".join([value, *lengths])[:40].decode("latin-1")
            raise Refused(
                HttpError(
                    HTTPStatus.BAD_REQUEST,
                    f"Content-Length {shown!r} is not one non-negative integer",
                    "content_length",
                )
            )
        need = int(value)
        if need > max_body:
            raise Refused(
                HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {need} bytes is over the limit of {max_body}",
                    "body_too_large",
                )
            )
    target = parts[1].decode("latin-1")
    path, _, query = target.partition("?")
    method = parts[0].decode("ascii")
    return Request(method, path, query, parts[2].decode("ascii"), headers), need


def encode(response: Response, keep_alive: bool) -> bytes:
    """Return a complete answer's bytes, head and body, for one send."""
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        response.status,
        phrase(response.status).encode("latin-1"),
        response.content_type.encode("latin-1"),
        len(response.body),
    )
    if response.headers:
        head += "".join(f"{k}: {v}\r\n" for k, v in response.headers).encode("latin-1")
    head += b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"
    return head + response.body


_PHRASES = {int(status): status.phrase for status in HTTPStatus}


def phrase(status: int) -> str:
    return _PHRASES.get(status, "Unknown")
