"""`autodl-agent run` as a real subprocess, and an MQTT watcher of what agents report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared import topics
from shared.codec import ProtocolError, decode
from shared.messages import Presence, ReportedState
from tests.support.processes import free_port, stop_process, wait_http_ready

FAST = {
    "AUTODL_AGENT_BACKOFF_MIN_S": "0.1",
    "AUTODL_AGENT_BACKOFF_MAX_S": "0.5",
    "AUTODL_AGENT_RETRY_MIN_S": "0.1",
    "AUTODL_AGENT_RETRY_MAX_S": "0.5",
    "AUTODL_AGENT_DISK_RESERVE_MB": "0",
    "AUTODL_AGENT_WARMUP_RUNS": "1",
    "AUTODL_AGENT_INTRA_OP_THREADS": "1",
    "AUTODL_AGENT_DOWNLOAD_CHUNK_BYTES": "4096",
    "AUTODL_AGENT_KEEPALIVE_S": "5",
}


def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll until `predicate` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


class AgentProcess:
    """One `autodl-agent run` subprocess with its own state dir and API port."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.env = {**os.environ, **FAST, **(env or {})}
        self.log_path = state_dir.parent / f"agent-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AgentProcess:
        cmd = [sys.executable, "-c", "from agent.cli import main; main()", "run"]
        cmd += ["--state-dir", str(self.state_dir), "--port", str(self.port)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_live(self, timeout: float = 60) -> None:
        assert self.proc is not None
        wait_http_ready(f"{self.url}/v2/health/ready", self.proc, "the agent", timeout, lambda: self.log()[-3000:])

    def serving(self, name: str) -> str | None:
        try:
            response = httpx.get(f"{self.url}/v2/models/{name}", timeout=2)
        except httpx.HTTPError:
            return None
        return response.json()["versions"][0] if response.status_code == 200 else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        return None if self.proc is None else stop_process(self.proc, 20)


class Watcher:
    """Collects every reported state and presence message from the broker."""

    def __init__(self, host: str, port: int) -> None:
        self.reported: list[ReportedState] = []
        self.presence: list[Presence] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-watcher", protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *a: c.subscribe(
            [
                (topics.device_wildcard(topics.DeviceChannel.REPORTED), 1),
                (topics.device_wildcard(topics.DeviceChannel.ONLINE), 1),
            ]
        )
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            decoded = decode(bytes(message.payload))
        except ProtocolError:
            return
        with self._lock:
            if isinstance(decoded, ReportedState):
                self.reported.append(decoded)
            elif isinstance(decoded, Presence):
                self.presence.append(decoded)

    def wait_reported(self, predicate: Callable[[ReportedState], bool], timeout: float = 30) -> ReportedState:
        def found() -> ReportedState | None:
            with self._lock:
                return next((r for r in reversed(self.reported) if predicate(r)), None)

        result: ReportedState = wait_until(found, timeout, "reported state")
        return result

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
