"""A small HTTP/1.1 server: one selector thread owns every connection, a bounded pool runs requests.

Why not `http.server.ThreadingHTTPServer`: it holds a thread per connection (1,000 idle
keep-alive clients are 1,000 threads), has no header or body deadline (a client sending
half a request holds its thread forever), and writes a response's headers and body in two
sends, which Nagle's algorithm and the client's delayed ACK turn into ~40 ms per request
on a kept-alive connection.

Here the selector thread reads requests without blocking: a connection costs a file
descriptor and a buffer until its request (head and body) is complete, and only then a
worker. Head and body have deadlines (408); a body is refused before it is read when it
is larger than the limit or does not fit the memory budget for bodies in flight (413);
`Transfer-Encoding` is refused (411), so a request's end is always its Content-Length and
nothing can be smuggled past it. Past `workers + queue` requests in flight the answer is
503 with Retry-After. A refused connection is closed after its answer (a lingering close,
so the client reads the answer instead of a reset). Responses go out in one send, with
TCP_NODELAY.

After answering, a worker waits a few milliseconds for the next request on the same
connection before handing it back to the selector, so a busy client costs no thread
hand-off. A request the server's `inline` test picks (a small model's inference, answered
in a fraction of a millisecond) is answered by the selector thread itself, with no
hand-off at all: for such requests the hand-off to a worker and back costs more than the
work, and with many clients the workers' turns at the GIL queue behind each other. Its
answer goes out in one non-blocking send; what the client's window cannot take yet, a
worker writes. After such an answer the selector polls for `busy_poll_s` (300 µs) before
it sleeps in the kernel, so a client sending requests back to back has its next one read
at once instead of after the core wakes from idle (on a 2-core VM that wake costs more
than the whole answer of the digits CNN: 0.19 -> 0.145 ms a round trip). It polls only
right after answering and only while no worker or deferred answer runs (the loop holds
the GIL most of the time), so an idle agent stays idle; the price is CPU while one client
sends back to back (105 -> 150 µs a request).

A handler may return `Streaming`: chunks written as they come (server-sent events), for
as long as the client stays; a write to a gone client closes the iterator.
A handler whose work another limit bounds (text generation) returns `Deferred`: its answer
is made and written on a thread of its own, the worker is free at once, and the
connection then goes back to the selector (its next request waits for a worker like any
other), so long generations never take the workers that plain inference needs.

Routes are a table of (method, pattern) -> handler; ``{name}`` in a pattern matches one
path segment (or the part of one, as in ``/v1/models/{name}:predict``).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from agent.http_messages import (
    Deferred,
    HttpError,
    Refused,
    Request,
    Response,
    Streaming,
    encode,
    parse_head,
    phrase,
)
from agent.routing import Router
from agent.runtime import release_heap

__all__ = ["Deferred", "HttpError", "HttpServer", "Limits", "Request", "Response", "Router", "Streaming"]

logger = logging.getLogger(__name__)

_RECV = 256 * 1024
_TRIM_AFTER = 4 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds of the server; every one of them is a setting of the agent."""

    workers: int = 8
    queue: int = 64  # requests waiting for a worker; past workers + queue: 503
    max_body: int = 32 * 1024 * 1024
    body_budget: int = 96 * 1024 * 1024  # bytes of bodies being received or served at once
    max_header: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: float = 75.0
    send_timeout_s: float = 30.0
    linger_s: float = 0.005  # a worker waits this long for the next request on its connection
    busy_poll_s: float = 0.0003  # after answering on the selector, poll this long before sleeping
    max_connections: int = 4096


class _Conn:
    """A connection's buffer and where its current request stands."""

    __slots__ = (
        "addr",
        "body",
        "buf",
        "deadline",
        "fd",
        "got",
        "head",
        "need",
        "refusal",
        "reserved",
        "sock",
        "state",
    )

    def __init__(self, sock: socket.socket, addr: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.refusal: HttpError | None = None  # found by a worker, answered by the selector
        self.addr = addr
        self.buf = bytearray()
        self.head: Request | None = None
        self.need = 0
        self.body: bytearray | None = None  # allocated once at the announced length, filled in place
        self.got = 0
        self.reserved = 0
        self.state = "idle"  # idle (keep-alive), head, body, linger (closing after a refusal)
        self.deadline = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclass(frozen=True)
class _Unsent:
    """The part of an inline answer the client's window did not take, for a worker to write."""

    data: memoryview
    result: Response
    keep_alive: bool


def _keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    return connection != "close" if request.version == "HTTP/1.1" else connection == "keep-alive"


class HttpServer:
    """Serve `router` on (host, port) until `stop()`."""

    def __init__(
        self,
        host: str,
        port: int,
        router: Router,
        limits: Limits | None = None,
        on_refused: Callable[[str], None] = lambda reason: None,
        error_body: Callable[[HttpError], bytes] = lambda e: str(e).encode(),
        inline: Callable[[Request], bool] = lambda request: False,
    ) -> None:
        """`inline(request)`: answer it on the selector thread (its handler and `after` must be quick)."""
        self.router = router
        self.inline = inline
        self.limits = limits or Limits()
        self.on_refused = on_refused
        self.error_body = error_body
        self._listen = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self._listen.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: list[_Conn] = []
        self._returned_lock = threading.Lock()
        self._work: queue.Queue[tuple[_Conn, Request, _Unsent | None] | None] = queue.Queue()
        self._in_flight = 0  # queued + running requests
        self._budget_used = 0
        self._count_lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deferred_threads: set[threading.Thread] = set()  # bounded by what the handlers admitted
        self._hot = False  # the selector just answered a request: its client's next may be close behind

    @property
    def port(self) -> int:
        """Return the bound port (useful with port 0)."""
        return int(self._listen.getsockname()[1])

    @property
    def connections(self) -> int:
        """Return the open connections (idle ones included)."""
        return len(self._conns)

    def start(self) -> None:
        """Start the selector thread and the workers."""
        self._selector.register(self._listen, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._threads.append(threading.Thread(target=self._select_loop, name="http-select", daemon=True))
        for i in range(self.limits.workers):
            self._threads.append(threading.Thread(target=self._work_loop, name=f"http-{i}", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop accepting, let running requests finish, close every connection."""
        self._stop.set()
        self._wake()
        for _ in range(self.limits.workers):
            self._work.put(None)
        for thread in self._threads:
            thread.join(5)
        deferred = list(self._deferred_threads)
        deadline = time.monotonic() + 5
        for thread in deferred:  # deferred answers get the same few seconds to finish
            thread.join(max(0.0, deadline - time.monotonic()))
        for conn in list(self._conns.values()):
            self._close(conn)
        for thread in deferred:  # their clients are gone now: a generation ends within a token
            thread.join(2)
        self._listen.close()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    # selector thread ----------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pipe is full: the selector is awake already

    def _select_loop(self) -> None:
        next_sweep = time.monotonic() + 0.25
        while not self._stop.is_set():
            try:
                events = self._poll()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            for key, _ in events:
                if key.fileobj is self._listen:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._take_returned()
                else:
                    self._readable(key.data)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + 0.25
                self._sweep()

    def _poll(self) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait for events; just after answering here, poll without sleeping for `busy_poll_s` first."""
        if self._hot:
            self._hot = False
            until = time.perf_counter() + self.limits.busy_poll_s
            while self._in_flight == 0 and not self._deferred_threads:  # no thread waits for the GIL it holds
                events = self._selector.select(0)
                if events:
                    return events
                if time.perf_counter() >= until:
                    break
        return self._selector.select(0.25)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors: refuse by not accepting for now
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    logger.warning("accept: %s", exc)
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr))
            if len(self._conns) >= self.limits.max_connections:
                self._refuse(conn, HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections", "connections"))
                continue
            conn.deadline = time.monotonic() + self.limits.keepalive_s
            with self._conns_lock:
                self._conns[conn.fd] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._returned_lock:
            returned, self._returned = self._returned, []
        for conn in returned:
            if conn.refusal is not None:
                error, conn.refusal = conn.refusal, None
                self._refuse(conn, error)
                continue
            try:
                conn.sock.setblocking(False)
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError, KeyError):
                self._close(conn)
                continue
            if conn.buf:  # bytes of the next request arrived while the worker wrote
                self._advance(conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            received = self._receive(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            received = False
        if not received:
            self._close(conn)
            return
        if conn.state != "linger":  # a refused client's bytes are read and dropped
            self._advance(conn)

    @staticmethod
    def _receive(conn: _Conn) -> bool:
        """Read what the socket has into the body (in place) or the head buffer; False at EOF."""
        if conn.body is not None:
            n = conn.sock.recv_into(memoryview(conn.body)[conn.got :])
            conn.got += n
            return n > 0
        data = conn.sock.recv(_RECV)
        if conn.state != "linger":
            conn.buf += data
        return bool(data)

    def _advance(self, conn: _Conn) -> None:
        while True:  # requests answered here may be followed by more in the buffer (pipelined)
            try:
                request = self._parse(conn)
            except Refused as refused:
                self._selector.unregister(conn.sock)
                self._refuse(conn, refused.error)
                return
            if request is None:
                return
            if not self.inline(request):
                break
            if not self._answer_here(conn, request) or not conn.buf:
                return
        with self._count_lock:
            busy = self._in_flight >= self.limits.workers + self.limits.queue
            if not busy:
                self._in_flight += 1
        self._selector.unregister(conn.sock)
        if busy:
            self._release(conn)
            self._refuse(
                conn,
                HttpError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"busy: {self.limits.workers + self.limits.queue} requests in flight; retry shortly",
                    "busy",
                    (("Retry-After", "1"),),
                ),
            )
            return
        self._work.put((conn, request, None))

    def _answer_here(self, conn: _Conn, request: Request) -> bool:
        """Answer an inline request on this thread; return whether the connection stays with the selector."""
        result = self._handle(request)
        if not isinstance(result, Response):  # an inline handler answers at once; streaming needs a thread
            if isinstance(result, Deferred):
                result.cancel()
            elif (close := getattr(result.chunks, "close", None)) is not None:
                close()
            logger.error("%s %s: an inline handler did not answer at once", request.method, request.path)
            error = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: no complete answer", "internal")
            self.on_refused(error.reason)
            result = Response(500, self.error_body(error))
        keep_alive = _keep_alive(request)
        data = encode(result, keep_alive)
        self._release(conn)
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return False
        if sent < len(data):  # the client's window is full: a worker, which may block, writes the rest
            self._selector.unregister(conn.sock)
            with self._count_lock:
                self._in_flight += 1
            self._work.put((conn, request, _Unsent(memoryview(data)[sent:], result, keep_alive)))
            return False
        self._after(result)
        self._hot = self.limits.busy_poll_s > 0
        if not keep_alive or self._stop.is_set():
            self._close(conn)
            return False
        conn.state = "idle"  # bytes of its next request already here start that request's clock (_parse)
        conn.deadline = time.monotonic() + self.limits.keepalive_s
        return True

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._conns_lock:
            due = [c for c in self._conns.values() if c.deadline <= now]
        for conn in due:
            if conn.state not in ("idle", "head", "body", "linger"):
                continue  # a worker holds it
            if conn.state == "head" or conn.state == "body":
                what = "request head" if conn.state == "head" else f"body ({conn.got} of {conn.need} bytes)"
                limit = self.limits.header_timeout_s if conn.state == "head" else self.limits.body_timeout_s
                self._selector.unregister(conn.sock)
                self._release(conn)
                self._refuse(
                    conn, HttpError(HTTPStatus.REQUEST_TIMEOUT, f"{what} not received within {limit:g} s", "timeout")
                )
            else:
                self._close(conn)

    # parsing --------------------------------------------------------------------------------------
    def _parse(self, conn: _Conn) -> Request | None:
        """Advance the connection's request with its buffer; return it once complete."""
        if conn.head is None:
            if conn.state in ("idle", "busy") and conn.buf:  # a new request's first bytes: its head's clock starts
                conn.state = "head"
                conn.deadline = time.monotonic() + self.limits.header_timeout_s
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.buf) > self.limits.max_header:
                    raise Refused(
                        HttpError(
                            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request head over {self.limits.max_header} bytes",
                            "head_too_large",
                        )
                    )
                return None
            head = bytes(conn.buf[:end])
            del conn.buf[: end + 4]
            conn.head, conn.need = parse_head(head, self.limits.max_body)
            conn.head.sock = conn.sock
            if conn.need:
                self._reserve(conn, conn.need)
                if conn.head.headers.get("expect", "").lower() == "100-continue" and not conn.buf:
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                conn.body = bytearray(conn.need)
                conn.got = min(len(conn.buf), conn.need)
                conn.body[: conn.got] = conn.buf[: conn.got]
                del conn.buf[: conn.got]
            conn.state = "body"
            conn.deadline = time.monotonic() + self.limits.body_timeout_s
        if conn.got < conn.need:
            return None
        request = conn.head
        request.body = conn.body if conn.body is not None else b""
        conn.head, conn.body, conn.got, conn.state = None, None, 0, "busy"
        return request

    def _reserve(self, conn: _Conn, size: int) -> None:
        with self._count_lock:
            fits = self._budget_used + size <= self.limits.body_budget
            if fits:
                self._budget_used += size
                conn.reserved = size
        if not fits:
            raise Refused(
                HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {size} bytes does not fit the {self.limits.body_budget} bytes of bodies in flight now",
                    "body_budget",
                    (("Retry-After", "1"),),
                )
            )

    def _release(self, conn: _Conn) -> None:
        if conn.reserved:
            with self._count_lock:
                self._budget_used -= conn.reserved
            conn.reserved = 0

    # answering ------------------------------------------------------------------------------------
    def _refuse(self, conn: _Conn, error: HttpError) -> None:
        """Answer `error`, close our side, and discard what the client still sends for a moment."""
        self.on_refused(error.reason)
        logger.debug("%s refused: %s", conn.addr, error)
        data = encode(Response(int(error.status), self.error_body(error), headers=error.headers), False)
        try:
            conn.sock.send(data)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state, conn.buf, conn.head, conn.body = "linger", bytearray(), None, None
        conn.deadline = time.monotonic() + 2.0
        with self._conns_lock:
            self._conns[conn.fd] = conn
        try:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        except (KeyError, ValueError, OSError):
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._release(conn)
        self._forget(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _forget(self, conn: _Conn) -> None:
        with self._conns_lock:
            if self._conns.get(conn.fd) is conn:
                del self._conns[conn.fd]

    # workers ------------------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, request, unsent = item
            try:
                self._serve(conn, request, unsent)
            except Exception:  # one connection must never take a worker down
                logger.exception("%s: connection failed", conn.addr)
                self._close_from_worker(conn)
            finally:
                with self._count_lock:
                    self._in_flight -= 1

    def _serve(self, conn: _Conn, request: Request, unsent: _Unsent | None = None) -> None:
        conn.sock.settimeout(self.limits.send_timeout_s)
        while True:
            result: Response | Streaming
            if unsent is not None:  # the rest of an answer the selector began to write
                result, keep_alive = unsent.result, unsent.keep_alive
                try:
                    conn.sock.sendall(unsent.data)
                except OSError:
                    keep_alive = False
                unsent = None
            else:
                answer = self._handle(request)
                if isinstance(answer, Deferred):
                    if self._defer(conn, request, answer):
                        return
                    error = HttpError(
                        HTTPStatus.SERVICE_UNAVAILABLE, "busy: no thread", "busy", (("Retry-After", "1"),)
                    )
                    self.on_refused(error.reason)
                    answer = Response(503, self.error_body(error), headers=error.headers)
                result = answer
                keep_alive = self._write(conn, request, result)
            self._after(result)
            self._release(conn)
            if not keep_alive or self._stop.is_set():
                self._close_from_worker(conn)
                return
            # The selector answers its next request, if that is as quick (the first of a model's was not).
            next_request = None if self.inline(request) else self._linger(conn)
            if next_request is None:
                self._hand_back(conn)
                return
            request = next_request

    def _defer(self, conn: _Conn, request: Request, deferred: Deferred) -> bool:
        """Start a deferred answer's thread; False (what the handler took given back) when none can be had."""
        self._release(conn)  # the body is parsed: its budget is free before the long work starts
        thread = threading.Thread(
            target=self._deferred, args=(conn, request, deferred), name="http-deferred", daemon=True
        )
        self._deferred_threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            logger.warning("no thread for a deferred answer: %s", exc)
            self._deferred_threads.discard(thread)
            deferred.cancel()
            return False
        return True

    def _deferred(self, conn: _Conn, request: Request, deferred: Deferred) -> None:
        """Make and write a deferred answer on this thread; then the connection goes back to the selector."""
        try:
            result = self._handle(request, deferred.run)
            if isinstance(result, Deferred):  # its `run` must answer, not defer again
                error = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: deferred twice", "internal")
                result = Response(500, self.error_body(error))
            keep_alive = self._write(conn, request, result)
            self._after(result)
            if keep_alive and not self._stop.is_set():
                self._hand_back(conn)
            else:
                self._close_from_worker(conn)
        except Exception:  # one connection must never take the server down
            logger.exception("%s: connection failed", conn.addr)
            self._close_from_worker(conn)
        finally:
            self._deferred_threads.discard(threading.current_thread())

    def _hand_back(self, conn: _Conn) -> None:
        """Give a kept-alive connection back to the selector, which waits for its next request."""
        conn.state = "idle" if not conn.buf else conn.state
        conn.deadline = time.monotonic() + (self.limits.keepalive_s if not conn.buf else self.limits.header_timeout_s)
        with self._returned_lock:
            self._returned.append(conn)
        self._wake()

    def _linger(self, conn: _Conn) -> Request | None:
        """Read the connection's next request here if it comes within `linger_s` and no one waits."""
        deadline = time.monotonic() + self.limits.linger_s
        while True:
            try:
                request = self._parse(conn)
            except Refused as refused:
                conn.refusal = refused.error  # the selector answers it
                return None
            if request is not None:
                return request
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._work.empty():
                return None
            try:
                readable, _, _ = select.select([conn.sock], [], [], remaining)
                if not readable or not self._receive(conn):
                    return None
            except (OSError, ValueError):
                return None

    def _handle(
        self, request: Request, run: Callable[[], Response | Streaming] | None = None
    ) -> Response | Streaming | Deferred:
        """Run the request's handler (or a deferred answer's `run`); errors become answers."""
        try:
            if run is not None:
                result: Response | Streaming | Deferred = run()
            else:
                handler, request.params = self.router.match(request.method, request.path)
                result = handler(request)
        except HttpError as exc:
            self.on_refused(exc.reason)
            result = Response(int(exc.status), self.error_body(exc), headers=exc.headers)
        except Exception as exc:  # one bad request must never take the server down
            logger.exception("%s %s failed", request.method, request.path)
            error = HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}", "internal")
            self.on_refused(error.reason)
            result = Response(500, self.error_body(error))
        if len(request.body) >= _TRIM_AFTER:
            request.body = b""  # the body's budget is released after this answer: drop it now
            release_heap()  # and give its pages back, or malloc keeps them for the process's life
        request.body = b""
        return result

    def _write(self, conn: _Conn, request: Request, result: Response | Streaming) -> bool:
        """Write an answer; return whether to keep the connection."""
        keep_alive = _keep_alive(request)
        if isinstance(result, Streaming):
            self._stream(conn, result, request.version == "HTTP/1.1")
            return keep_alive and request.version == "HTTP/1.1"
        try:
            conn.sock.sendall(encode(result, keep_alive))
        except OSError:
            return False
        return keep_alive

    @staticmethod
    def _after(result: Response | Streaming) -> None:
        """Run an answer's `after` work; its failure is logged, the connection goes on."""
        if isinstance(result, Response) and result.after is not None:
            try:
                result.after()
            except Exception:  # work after an answer must never take a connection down
                logger.exception("work after an answer failed")

    def _stream(self, conn: _Conn, result: Streaming, chunked: bool) -> None:
        head = [
            f"HTTP/1.1 {result.status} {phrase(result.status)}",
            f"Content-Type: {result.content_type}",
            "Cache-Control: no-cache",
            *(f"{k}: {v}" for k, v in result.headers),
            "Transfer-Encoding: chunked" if chunked else "Connection: close",
        ]
        try:
            conn.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            for chunk in result.chunks:
                if chunk:
                    conn.sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.sock.sendall(b"0\r\n\r\n")
        except OSError:
            logger.debug("%s: client gone during a streamed answer", conn.addr)
        finally:
            close = getattr(result.chunks, "close", None)
            if close is not None:
                close()  # a generator learns the client left (GeneratorExit) and frees its work

    def _close_from_worker(self, conn: _Conn) -> None:
        self._release(conn)
        self._forget(conn)
        try:
            conn.sock.close()
        except OSError:
            pass


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one (idle connections are file descriptors)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else os.sysconf("SC_OPEN_MAX")
