"""A TCP proxy in front of the hub that can stall artifact downloads midway and records Range headers."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

__all__ = ["StallProxy"]


class StallProxy:
    """Forwards 127.0.0.1:port to the hub; while `hold_after` is set, an artifact response stops after that many bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.hold_after: int | None = None
        self.holding = threading.Event()
        self.released = threading.Event()
        self.ranges: list[str | None] = []  # Range header of each GET /artifacts/ request
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopped = True
        self.released.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"artifact": False}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, state), daemon=True).start()

    def _requests(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:  # GET requests carry no body
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    text = head.decode("latin-1")
                    state["artifact"] = text.startswith("GET /artifacts/")
                    if state["artifact"]:
                        found = re.search(r"(?im)^range:\s*(.+)$", text)
                        self.ranges.append(found.group(1).strip() if found else None)
                    dst.sendall(head + b"\r\n\r\n")
                if buffer and b"\r\n\r\n" not in buffer and not buffer.startswith((b"GET", b"HEAD")):
                    dst.sendall(buffer)  # a request body (POST/PUT)
                    buffer = b""
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _responses(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                limit = self.hold_after
                if state["artifact"] and limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.holding.set()
                    self.released.wait(120)
                    return  # the transfer breaks off: the client sees a truncated body
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()
