"""A real hub process for end-to-end tests: ``autodl-hub init`` then ``autodl-hub serve``.

    with HubProcess(tmp_path / "hub") as hub:          # embedded mosquitto on a free port
        hub.url, hub.admin_key, hub.mqtt_port
        hub.api().get("/devices")                       # httpx.Client with the admin key
        token = hub.enrollment_token(max_uses=2)

`HubProcess(..., mqtt=False)` serves HTTP only; `mqtt_url=broker.url` with
`mqtt_password` uses an external broker instead; `env` adds AUTODL_HUB_* settings
(for example ``{"AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "2"}``); `workers=0` runs no embedded
training worker. `WorkerProcess(hub, "w1")` is an ``autodl-hub worker`` on the hub's database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.support.processes import free_port, stop_process, wait_http_ready

__all__ = ["HubProcess", "WorkerProcess"]

# The installed console script, as a user runs it; the module form where it is not installed.
_SCRIPT = Path(sys.executable).with_name("autodl-hub")
_CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "from hub.cli.main import main; main()"]


class HubProcess:
    """A hub started as a subprocess on free ports with its own data dir."""

    def __init__(
        self,
        data_dir: Path,
        *,
        mqtt: bool = True,
        database_url: str | None = None,
        mqtt_url: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        workers: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.workers = workers
        self.port = free_port()
        self.mqtt_port = free_port()
        self.mqtt = mqtt
        self.start_timeout = start_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-hub.log"
        self.env = {
            **os.environ,
            "AUTODL_HUB_DATA_DIR": str(data_dir),
            "AUTODL_HUB_PORT": str(self.port),
            "AUTODL_HUB_HOST": "127.0.0.1",
            "AUTODL_HUB_PUBLIC_URL": self.url,
            "AUTODL_HUB_MQTT_PORT": str(self.mqtt_port),
            "AUTODL_HUB_MQTT_PUBLIC_HOST": "127.0.0.1",
            "AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "30",
            "AUTODL_HUB_TELEMETRY_FLUSH_S": "0.2",
            **({"AUTODL_HUB_DATABASE_URL": database_url} if database_url else {}),
            **({"AUTODL_HUB_MQTT_URL": mqtt_url} if mqtt_url else {}),
            **(env or {}),
        }
        self._proc: subprocess.Popen[bytes] | None = None

    def run_cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``autodl-hub ARGS`` against this hub's data dir and environment."""
        result = subprocess.run([*_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"autodl-hub {' '.join(args)} failed: {result.stderr or result.stdout}")
        return result

    def init(self) -> str:
        """Run ``autodl-hub init`` and return the first admin key."""
        out = json.loads(self.run_cli("init", "--json").stdout.strip().splitlines()[-1])
        self.admin_key = out["admin_key"] or self.admin_key
        return self.admin_key

    def start(self) -> None:
        """Init (once) and serve; return when /readyz answers 200."""
        if not self.admin_key:
            self.init()
        args = ["serve", "--log-level", "info"] + ([] if self.mqtt else ["--no-mqtt"])
        args += [] if self.workers is None else ["--workers", str(self.workers)]
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen([*_CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_http_ready(f"{self.url}/readyz", self._proc, "the hub", self.start_timeout, self.log_tail)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the hub (SIGTERM: it stops its broker too); return its exit code."""
        proc, self._proc = self._proc, None
        return None if proc is None else stop_process(proc, timeout, sig)

    @property
    def running(self) -> bool:
        """Return True while the hub process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Return the hub's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the hub's log."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def api(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        """Return an HTTP client for the hub with `key` (the admin key by default)."""
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def enrollment_token(self, max_uses: int = 1, labels: dict[str, str] | None = None) -> str:
        """Create an enrollment token through the API."""
        with self.api() as client:
            response = client.post("/enrollment-tokens", json={"max_uses": max_uses, "labels": labels or {}})
            response.raise_for_status()
            token: str = response.json()["token"]
            return token

    def __enter__(self) -> HubProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class WorkerProcess:
    """An ``autodl-hub worker`` process on a hub's database and data dir, named `name`."""

    def __init__(self, hub: HubProcess, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = {**hub.env, **(env or {})}
        self.log_path = hub.data_dir.parent / f"worker-{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker (it connects and polls on its own)."""
        log = self.log_path.open("ab")
        args = ["worker", "--name", self.name, "--log-level", "info"]
        self._proc = subprocess.Popen([*_CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop the worker (SIGTERM: it re-queues a running job; SIGKILL: it just dies)."""
        proc, self._proc = self._proc, None
        return None if proc is None else stop_process(proc, timeout, sig)

    @property
    def running(self) -> bool:
        """Return True while the worker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the worker's log."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
