"""agent.http over real sockets: the worker bound (503), streaming answers, the route table."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from agent.http import Deferred, HttpServer, Limits, Request, Response, Router, Streaming
from tests.support.waiting import wait_for


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def serve(
    router: Router, inline: Callable[[Request], bool] = lambda r: False, **limits: float
) -> tuple[HttpServer, list[str]]:
    refused: list[str] = []
    server = HttpServer("127.0.0.1", 0, router, Limits(**limits), refused.append, inline=inline)  # type: ignore[arg-type]
    server.start()
    return server, refused


def test_past_workers_and_queue_the_answer_is_503_with_retry_after(gate: threading.Event) -> None:
    router = Router()
    router.add("GET", "/slow", lambda r: (gate.wait(10), Response(200, b"{}"))[1])
    server, refused = serve(router, workers=1, queue=1)
    url = f"http://127.0.0.1:{server.port}/slow"
    try:
        held = [threading.Thread(target=httpx.get, args=(url,), kwargs={"timeout": 20}) for _ in range(2)]
        for t in held:
            t.start()
        time.sleep(0.5)  # one running, one queued
        response = httpx.get(url, timeout=10)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "busy" in response.text and refused == ["busy"]
        gate.set()
        for t in held:
            t.join(10)
        assert httpx.get(url, timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_streamed_answer_arrives_chunk_by_chunk_and_a_gone_client_closes_the_generator() -> None:
    closed = threading.Event()

    def events(request: Request) -> Streaming:
        def chunks() -> Iterator[bytes]:
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n".encode()
                    time.sleep(0.01)
            finally:
                closed.set()

        return Streaming(chunks())

    router = Router()
    router.add("POST", "/v1/stream", events)
    server, _ = serve(router, workers=2)
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{server.port}/v1/stream", timeout=10) as response:
            assert response.headers["content-type"] == "text/event-stream"
            lines = []
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    break
        assert lines == ["data: 0", "data: 1", "data: 2"]
        assert closed.wait(10)  # the client left: the generator was closed, its work freed
    finally:
        server.stop()


def test_deferred_answers_free_the_worker_and_hand_the_connection_back(gate: threading.Event) -> None:
    def long(request: Request) -> Deferred:
        def run() -> Streaming:
            gate.wait(20)
            return Streaming(iter([b"data: done\n\n"]))

        return Deferred(run)

    router = Router()
    router.add("POST", "/long", long)
    router.add("GET", "/quick", lambda r: Response(200, b"quick"))
    server, refused = serve(router, workers=1, queue=2)  # three plain requests held would fill it
    base = f"http://127.0.0.1:{server.port}"
    answers: list[str] = []
    try:
        with httpx.Client(timeout=30) as kept:

            def ask_long() -> None:
                answers.append(kept.post(f"{base}/long").text)

            held = [threading.Thread(target=ask_long) for _ in range(3)]
            for t in held:
                t.start()
            time.sleep(0.5)  # three deferred answers wait on the gate; none holds the worker or a queue place
            assert [httpx.get(f"{base}/quick", timeout=10).text for _ in range(4)] == ["quick"] * 4
            assert refused == []
            gate.set()
            for t in held:
                t.join(20)
            assert answers == ["data: done\n\n"] * 3
            # Their connections went back to the selector (kept alive, not closed), and serve the next request.
            wait_for("the three kept-alive connections open", lambda: server.connections == 3, 10)
            assert kept.get(f"{base}/quick").text == "quick"
            assert server.connections == 3
    finally:
        server.stop()


def test_routes_match_patterns_and_name_the_allowed_methods() -> None:
    router = Router()
    router.add("GET", "/v2/models/{name}", lambda r: Response(200, r.params["name"].encode()))
    router.add("POST", "/v1/models/{name}:predict", lambda r: Response(200, b"p:" + r.params["name"].encode()))
    server, _ = serve(router)
    base = f"http://127.0.0.1:{server.port}"
    try:
        for name in ("digits", "other", "digits"):  # a path matched before is looked up, with its own params
            assert httpx.get(f"{base}/v2/models/{name}").text == name
        assert httpx.post(f"{base}/v1/models/digits:predict").text == "p:digits"
        wrong = httpx.post(f"{base}/v2/models/digits")
        assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET"
        assert httpx.get(f"{base}/nothing").status_code == 404
    finally:
        server.stop()


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    router = Router()
    router.add("POST", "/echo", lambda r: Response(200, bytes(r.body)))
    server, _ = serve(router)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            one = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            two = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nde"
            sock.sendall(one + two)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data.count(b"HTTP/1.1 200") == 2 and data.index(b"abc") < data.index(b"de")
    finally:
        server.stop()


def test_the_one_pass_head_reading_agrees_with_the_strict_one() -> None:
    """Common heads are read in one pass; on any head, it accepts or refuses what the strict reading does."""
    from agent.http_messages import Refused, _parse_head_strictly, parse_head

    def read(parse: object, raw: bytes) -> tuple[object, ...]:
        try:
            request, need = parse(raw, 1000)  # type: ignore[operator]
            return (request.method, request.path, request.query, request.version, request.headers, need)
        except Refused as refused:
            return (refused.error.status, str(refused.error))

    lines = [b"GET / HTTP/1.1", b"POST /v2/models/x/infer?a=1 HTTP/1.0", b"GET  / HTTP/1.1", b"G\xe9T / HTTP/1.1",
             b"GET / HTTP/2", b"GET /\xe9 HTTP/1.1", b"GET /"]  # fmt: skip
    fields = [b"Host: a", b"Content-Length: 12", b"content-length:12", b"Content-Length: 12 ", b"Content-Length: 2000",
              b"Content-Length: -1", b"Content-Length: \xb2", b"Content-Length: 0012", b"Transfer-Encoding: chunked",
              b"Bad Header: x", b"NoColon", b":empty", b"X-A:\tv\t", b"X-\xe9: 1", b"Host\n: a", b"X: a\nb",
              b"Content-Length: 99999999999999999999"]  # fmt: skip
    for i, line in enumerate(lines):
        for a in range(len(fields)):
            for b in range(a, len(fields), 3):
                raw = line + b"\r\n" + fields[a] + b"\r\n" + fields[(b + i) % len(fields)]
                assert read(parse_head, raw) == read(_parse_head_strictly, raw), raw
                assert read(parse_head, line) == read(_parse_head_strictly, line)


def test_work_after_an_answer_runs_once_it_is_written_and_its_failure_keeps_the_connection() -> None:
    release = threading.Event()
    ran: list[str] = []

    def after() -> None:
        release.wait(10)  # the client already has its answer while this still runs
        ran.append("after")
        raise RuntimeError("capture failed")

    router = Router()
    router.add("GET", "/answer", lambda r: Response(200, b'{"ok": true}', after=after))
    server, _ = serve(router, workers=1)
    try:
        with httpx.Client(timeout=10) as client:
            first = client.get(f"http://127.0.0.1:{server.port}/answer")
            assert first.json() == {"ok": True} and ran == []
            release.set()
            second = client.get(f"http://127.0.0.1:{server.port}/answer")  # the same kept-alive connection
            assert second.json() == {"ok": True}
            wait_for("the second after", lambda: len(ran) == 2, 10)
            assert client.get(f"http://127.0.0.1:{server.port}/answer").status_code == 200
    finally:
        server.stop()


def _answers(sock: socket.socket, count: int) -> list[bytes]:
    """Read `count` answers (Content-Length framed) from a socket; return their bodies."""
    data, bodies = bytearray(), list[bytes]()
    while len(bodies) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            data += chunk
        end = data.index(b"\r\n\r\n")
        length = int(bytes(data[:end]).lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        del data[: end + 4]
        while len(data) < length:
            data += sock.recv(1 << 20)
        bodies.append(bytes(data[:length]))
        del data[:length]
    return bodies


def test_inline_requests_are_answered_by_the_selector_in_order_with_the_others_pipelined_between() -> None:
    router = Router()
    router.add(
        "POST", "/quick", lambda r: Response(200, b"%s:%s" % (bytes(r.body), threading.current_thread().name.encode()))
    )
    router.add(
        "POST", "/slow", lambda r: Response(200, b"%s:%s" % (bytes(r.body), threading.current_thread().name.encode()))
    )
    server, _ = serve(router, inline=lambda r: r.path == "/quick")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            paths = ["/quick", "/quick", "/slow", "/quick", "/slow", "/quick"] * 20
            sock.sendall(b"".join(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n%03d" % (p.encode(), i)
                                  for i, p in enumerate(paths)))  # fmt: skip
            bodies = _answers(sock, len(paths))
        assert [b.split(b":")[0] for b in bodies] == [b"%03d" % i for i in range(len(paths))]
        # The worker that answered a slow one may take the request after it; then the selector has it again.
        threads = [b.split(b":")[1] for b in bodies]
        after_quick = {t for i, t in enumerate(threads) if paths[i] == "/quick" and paths[i - 1] == "/quick"}
        assert after_quick == {b"http-select"}
        assert b"http-select" not in {t for t, p in zip(threads, paths, strict=True) if p == "/slow"}
    finally:
        server.stop()


def test_an_inline_answer_the_client_is_slow_to_read_is_written_by_a_worker_while_the_selector_goes_on() -> None:
    big = bytes(range(256)) * (128 * 1024)  # 32 MB: far more than the sockets' buffers hold
    router = Router()
    router.add("GET", "/big", lambda r: Response(200, big))
    router.add("GET", "/small", lambda r: Response(200, b"small"))
    server, _ = serve(router, inline=lambda r: True)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)  # the answer fills the buffers; a worker waits to write the rest
            with httpx.Client(timeout=5) as other:
                for _ in range(20):
                    assert other.get(f"http://127.0.0.1:{server.port}/small").text == "small"
            assert _answers(slow, 1) == [big]
            slow.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection goes on
            assert _answers(slow, 1) == [b"small"]
    finally:
        server.stop()


def _cpu_s(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _quick_and_slow(busy_poll_s: float) -> tuple[HttpServer, list[threading.Thread]]:
    """Serve GET /quick on the selector (which it notes) and GET /slow, 1.5 s, on a worker."""
    selector: list[threading.Thread] = []
    router = Router()
    router.add("GET", "/quick", lambda r: selector.append(threading.current_thread()) or Response(200, b"quick"))
    router.add("GET", "/slow", lambda r: time.sleep(1.5) or Response(200, b"slow"))
    server, _ = serve(router, inline=lambda r: r.path == "/quick", busy_poll_s=busy_poll_s)
    return server, selector


def test_after_its_answers_the_selector_polls_for_a_moment_then_sleeps() -> None:
    server, selector = _quick_and_slow(busy_poll_s=0.1)
    try:
        with httpx.Client(timeout=5) as client:  # kept alive: its next request could come at any moment
            for _ in range(20):
                assert client.get(f"http://127.0.0.1:{server.port}/quick").text == "quick"
            assert selector[0].name == "http-select"
            began = _cpu_s(selector[0])
            time.sleep(1.0)
            assert _cpu_s(selector[0]) - began < 0.3  # one window of 0.1 s after the last answer, then asleep
    finally:
        server.stop()


def test_the_selector_does_not_poll_while_a_worker_runs() -> None:
    server, selector = _quick_and_slow(busy_poll_s=5.0)
    url = f"http://127.0.0.1:{server.port}"
    try:
        slow = threading.Thread(target=lambda: httpx.get(f"{url}/slow", timeout=5))
        slow.start()
        wait_for("a worker runs", lambda: server.connections == 1, 5)
        time.sleep(0.1)
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{url}/quick").text == "quick"
            began = _cpu_s(selector[0])
            time.sleep(0.5)
            assert _cpu_s(selector[0]) - began < 0.1  # the worker needs the GIL the poll would hold
        slow.join()
    finally:
        server.stop()
