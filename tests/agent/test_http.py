"""agent.http over real sockets: the worker bound (503), streaming answers, the route table."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.http import HttpServer, Limits, Request, Response, Router, Streaming


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def serve(router: Router, **limits: float) -> tuple[HttpServer, list[str]]:
    refused: list[str] = []
    server = HttpServer("127.0.0.1", 0, router, Limits(**limits), refused.append)  # type: ignore[arg-type]
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


def test_routes_match_patterns_and_name_the_allowed_methods() -> None:
    router = Router()
    router.add("GET", "/v2/models/{name}", lambda r: Response(200, r.params["name"].encode()))
    router.add("POST", "/v1/models/{name}:predict", lambda r: Response(200, b"p:" + r.params["name"].encode()))
    server, _ = serve(router)
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(f"{base}/v2/models/digits").text == "digits"
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
