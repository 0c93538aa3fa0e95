"""Real processes for tests: free ports, waiting for a listener, a mosquitto broker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

__all__ = ["Broker", "answers_ok", "free_port", "stop_process", "wait_for_port", "wait_http_ready"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float, sig: signal.Signals = signal.SIGTERM) -> int:
    """Send `sig` unless `proc` has ended, wait up to `timeout`, then SIGKILL; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def answers_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    """Return True when GET `url` answers 200 within a second (HTTPS verified with `verify`)."""
    try:
        return httpx.get(url, timeout=1, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def wait_http_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    what: str,
    timeout: float,
    log: Callable[[], str] = lambda: "",
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Wait until GET `url` answers 200; RuntimeError if `proc` exits first, TimeoutError past `timeout`.

    Both errors name `what` and end with `log()` (the process's log tail, say).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        if answers_ok(url, verify):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready after {timeout}s:\n{log()}")


def mosquitto_binary() -> str:
    """Return the path of the mosquitto binary, or fail with how to install it."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError(
            "mosquitto is not installed: run `make test` (it installs it) or `apt-get install mosquitto`"
        )
    return found


class Broker:
    """A mosquitto on a free loopback port with its own persistence dir.

    `stop()` ends it cleanly (it saves retained messages and sessions), `kill()` ends it
    hard, `start()` brings it back on the same port with the same data.
    """

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true" if "allow_anonymous" not in extra_config else "",
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_path.write_text("\n".join(line for line in lines if line) + "\n" + extra_config)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Return True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, self.host)
        except TimeoutError:
            err = b""
            if self._proc.poll() is not None and self._proc.stderr is not None:
                err = self._proc.stderr.read()
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(f"mosquitto did not start: {err.decode()} {log[-2000:]}") from None

    def stop(self) -> None:
        """Stop the broker cleanly (it writes its persistence file)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the broker hard, as a crash would."""
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        """Stop cleanly and start again on the same port."""
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 10, sig)
