"""Limits before work, against a real hub process over raw sockets: huge bodies, anonymous uploads, slow clients."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.hub import HubProcess

pytestmark = [pytest.mark.e2e]

MB = 1024 * 1024
HUGE = 300 * MB
GROWTH_LIMIT = 8 * MB  # "a few MB"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, Path]]:
    root = tmp_path_factory.mktemp("limits")
    spool = root / "tmp"  # where a multipart parser would spool an upload
    spool.mkdir()
    env = {"AUTODL_HUB_HEADER_TIMEOUT_S": "1", "AUTODL_HUB_BODY_TIMEOUT_S": "1", "TMPDIR": str(spool)}
    with HubProcess(root / "hub", mqtt=False, env=env) as process:
        yield process, spool


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _disk(*roots: Path) -> int:
    return sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file())


def _push(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `head` then body chunks until the hub answers or drops us; return (answer, bytes of body sent)."""
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        try:
            sock.settimeout(10)
            while len(answer) < 65536:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def _json_body(total: int) -> Iterator[bytes]:
    yield b'{"token": "' + b"A" * (MB - 11)
    for _ in range(total // MB - 1):
        yield b"A" * MB


def _chunked(parts: Iterator[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_300_mb_json_body_to_enroll_is_refused_before_it_is_read(hub: tuple[HubProcess, Path], framing: str) -> None:
    process, spool = hub
    assert process.pid is not None
    httpx.get(f"{process.url}/healthz", timeout=10)
    rss, disk = _rss(process.pid), _disk(process.data_dir, spool)
    length = f"Content-Length: {HUGE}" if framing == "content-length" else "Transfer-Encoding: chunked"
    head = f"POST /enroll HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n{length}\r\n\r\n".encode()
    body = _json_body(HUGE) if framing == "content-length" else _chunked(_json_body(HUGE))
    answer, sent = _push(process.port, head, body)
    assert _status(answer) == 413
    assert b"AAAA" not in answer  # the body is not echoed
    assert sent < HUGE
    assert _rss(process.pid) - rss < GROWTH_LIMIT
    assert _disk(process.data_dir, spool) - disk < GROWTH_LIMIT
    assert httpx.get(f"{process.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_unauthenticated_300_mb_upload_is_refused_before_one_byte_is_spooled(
    hub: tuple[HubProcess, Path], framing: str
) -> None:
    process, spool = hub
    assert process.pid is not None
    rss, disk = _rss(process.pid), _disk(process.data_dir, spool)
    boundary = "xyzzy"
    length = f"Content-Length: {HUGE}" if framing == "content-length" else "Transfer-Encoding: chunked"
    head = (
        f"POST /models/digits/versions HTTP/1.1\r\nHost: hub\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{length}\r\n\r\n"
    ).encode()
    first = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="w.bin"\r\n\r\n'.encode()

    def parts() -> Iterator[bytes]:
        yield first + b"\0" * (MB - len(first))
        for _ in range(HUGE // MB - 1):
            yield b"\0" * MB

    answer, sent = _push(process.port, head, parts() if framing == "content-length" else _chunked(parts()))
    assert _status(answer) == 401
    assert b"www-authenticate: bearer" in answer.lower()
    assert sent < HUGE
    assert _rss(process.pid) - rss < GROWTH_LIMIT
    assert _disk(process.data_dir, spool) - disk < GROWTH_LIMIT


def test_an_upload_with_a_device_token_or_a_viewer_key_is_refused_before_the_body(
    hub: tuple[HubProcess, Path],
) -> None:
    process, _spool = hub
    with process.api() as client:
        created = client.post("/api-keys", json={"name": "viewer", "role": "viewer"})
        viewer = created.json()["key"]
    head = (
        "POST /models/digits/versions HTTP/1.1\r\nHost: hub\r\n"
        f"Authorization: Bearer {viewer}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {HUGE}\r\n\r\n"
    ).encode()
    answer, sent = _push(process.port, head, iter([b"\0" * MB] * 300))
    assert _status(answer) == 403
    assert sent < HUGE


def test_validation_errors_name_the_field_but_do_not_echo_the_input(hub: tuple[HubProcess, Path]) -> None:
    process, _spool = hub
    secret = "S3CRET-" + "x" * 200
    for body in (
        {"token": secret, "name": "n" * 129},
        {"token": secret, "labels": {"ring": "v" * 129}},
        {"token": secret, "labels": {"bad key!": "v"}},
        {"token": secret, "profile": {"cpu_flags": ["f" * 65]}},
    ):
        response = httpx.post(f"{process.url}/enroll", json=body, timeout=10)
        assert response.status_code == 422, response.text
        assert "S3CRET" not in response.text and "vvvv" not in response.text and "ffff" not in response.text
        assert response.json()["detail"][0]["loc"][0] == "body"


def test_a_client_that_never_finishes_its_headers_is_dropped(hub: tuple[HubProcess, Path]) -> None:
    process, _spool = hub
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n")  # and never the blank line
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the hub
        assert time.monotonic() - started < 8


def test_a_body_that_stalls_is_answered_408(hub: tuple[HubProcess, Path]) -> None:
    process, _spool = hub
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(
            b"POST /enroll HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = sock.recv(4096)
    assert _status(answer) == 408
