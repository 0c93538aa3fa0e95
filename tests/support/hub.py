"""A real hub process for end-to-end tests: ``autodl-hub init`` then ``autodl-hub serve``.

    with HubProcess(tmp_path / "hub") as hub:          # embedded mosquitto on a free port
        hub.url, hub.admin_key, hub.mqtt_port
        hub.api().get("/devices")                       # httpx.Client with the admin key
        hub.call("GET", "/devices")                     # JSON, AssertionError on an HTTP error
        token = hub.enrollment_token(max_uses=2)

`HubProcess(..., tls=True)` serves HTTPS and MQTT over TLS on loopback with the CA `init` made
(`ca_file`, `ca_hash`, `verify` for clients), device certificates on `mtls_port`; `HubProcess(..., mqtt=False)` serves HTTP only; `broker=secured_broker(...)` (or `mqtt_url=` with
``AUTODL_HUB_MQTT_PASSWORD`` in `env`) uses an external broker instead; `env` adds AUTODL_HUB_*
settings (for example ``{"AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "2"}``). `publish(release)` puts a
signed version straight into its registry (before or while it runs); `kill()` is a crash and
`start()` a restart on the same ports and data. `workers=0` runs no embedded training worker;
`WorkerProcess(hub, "w1")` is an ``autodl-hub worker`` on the hub's database and data dir.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import Session

from hub.broker.embedded import EmbeddedBroker
from hub.config import HubSettings
from hub.db import create_engine_for, session_factory
from hub.models import Role
from hub.registry import publish_version
from hub.security import create_api_key, create_enrollment_token
from shared.tls import ca_hash
from tests.support.models import Release, make_release, write_files
from tests.support.processes import free_port, stop_process, wait_http_ready

__all__ = ["HUB_CLI", "HubProcess", "WorkerProcess", "train_json"]

# The installed console script, as a user runs it; the module form where it is not installed.
_SCRIPT = Path(sys.executable).with_name("autodl-hub")
HUB_CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "from hub.cli.main import main; main()"]


def train_json(task: Path, data_dir: Path, timeout: float) -> dict[str, Any]:
    """`autodl-hub train TASK --json --data-dir DIR` as a user runs it; return its summary."""
    done = subprocess.run(
        [*HUB_CLI, "train", str(task), "--json", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


class HubProcess:
    """A hub started as a subprocess on free ports with its own data dir."""

    def __init__(
        self,
        data_dir: Path,
        broker: EmbeddedBroker | None = None,
        *,
        mqtt: bool = True,
        database_url: str | None = None,
        mqtt_url: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        log_level: str = "info",
        workers: int | None = None,
        tls: bool = False,
    ) -> None:
        self.workers = workers
        self.tls = tls
        self.data_dir = data_dir
        self.port = free_port()
        self.mqtt_port = free_port()
        self.mtls_port = free_port()  # the broker's device-certificate listener (tls=True)
        self.mqtt = mqtt
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.admin_key = ""
        self.log_path = data_dir.parent / f"{data_dir.name}-hub.log"
        if broker is not None:
            mqtt_url = broker.url
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
            **({"AUTODL_HUB_TLS": "true", "AUTODL_HUB_MQTT_MTLS_PORT": str(self.mtls_port)} if tls else {}),
            **({"AUTODL_HUB_DATABASE_URL": database_url} if database_url else {}),
            **({"AUTODL_HUB_MQTT_URL": mqtt_url} if mqtt_url else {}),
            **({"AUTODL_HUB_MQTT_PASSWORD": broker.hub_password} if broker is not None else {}),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def run_cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``autodl-hub ARGS`` against this hub's data dir and environment."""
        result = subprocess.run([*HUB_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"autodl-hub {' '.join(args)} failed: {result.stderr or result.stdout}")
        return result

    def init(self) -> str:
        """Run ``autodl-hub init`` and return the first admin key."""
        out = json.loads(self.run_cli("init", "--json").stdout.strip().splitlines()[-1])
        self.admin_key = out["admin_key"] or self.admin_key
        return self.admin_key

    @property
    def ca_file(self) -> Path:
        """Return the hub's CA certificate (made by `init`)."""
        return self.data_dir / "tls" / "ca.pem"

    @property
    def ca_hash(self) -> str:
        """Return the pin of the hub's CA, as `token create` prints it."""
        return ca_hash(self.ca_file.read_bytes())

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """Return what an HTTPS client of this hub verifies with (True for a plain hub)."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.tls else True

    @property
    def settings(self) -> HubSettings:
        """Return the settings the hub process runs with (data dir and database)."""
        return HubSettings(data_dir=self.data_dir, database_url=self.env.get("AUTODL_HUB_DATABASE_URL", ""))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open a database session on the hub's database (init first), for set-up done behind its API."""
        if not self.admin_key:
            self.init()
        engine = create_engine_for(self.settings)
        try:
            with session_factory(engine)() as session:
                yield session
        finally:
            engine.dispose()

    def publish(self, release: Release) -> None:
        """Publish a test release straight into the hub's registry (the hub's key signs it)."""
        files = write_files(release, self.data_dir.parent / "releases" / release.name / release.version)
        with self.session() as session:
            publish_version(session, self.settings, release.manifest, files, actor="test")

    def prepare(self, model: str, versions: dict[str, dict[str, Any]]) -> tuple[str, str]:
        """Publish `versions` of `model` ({version: make_release kwargs}) before the hub starts;
        return (an operator API key, an enrollment token for 100 devices)."""
        signer = Ed25519PrivateKey.generate()  # the hub re-signs with its own key
        for version, kwargs in versions.items():
            self.publish(make_release(signer, model, version, **kwargs))
        with self.session() as session:
            key = create_api_key(session, "operator", Role.OPERATOR, actor="test")[1]
            token = create_enrollment_token(session, actor="test", max_uses=100)[1]
        return key, token

    def start(self) -> None:
        """Init (once) and serve; return when /readyz answers 200."""
        if not self.admin_key:
            self.init()
        args = ["serve", "--log-level", self.log_level] + ([] if self.mqtt else ["--no-mqtt"])
        args += [] if self.workers is None else ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*HUB_CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        try:
            wait_http_ready(f"{self.url}/readyz", self.proc, "the hub", self.start_timeout, self.log_tail, self.verify)
        except TimeoutError:
            self.stop()
            raise

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the hub (SIGTERM: it stops its broker too); return its exit code."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, timeout, sig)

    def kill(self) -> None:
        """End the hub hard (SIGKILL), as a crash or an OOM kill would."""
        self.stop(signal.SIGKILL, timeout=10)

    @property
    def running(self) -> bool:
        """Return True while the hub process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Return the hub's process id while it runs."""
        return self.proc.pid if self.running and self.proc is not None else None

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the hub's log."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def api(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        """Return an HTTP client for the hub with `key` (the admin key by default)."""
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        kwargs.setdefault("verify", self.verify)
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def call(self, method: str, path: str, *, key: str | None = None, **kwargs: Any) -> Any:
        """Call the API with `key` (the admin key by default); return the JSON body, AssertionError on >= 400."""
        with self.api(key) as client:
            response = client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def new_key(self, role: str, name: str | None = None) -> str:
        """Create an API key with `role` (viewer, operator, admin) through the API."""
        body = self.call("POST", "/api-keys", json={"name": name or f"{role}-{uuid.uuid4().hex[:6]}", "role": role})
        key: str = body["key"]
        return key

    def enrollment_token(self, max_uses: int = 1, labels: dict[str, str] | None = None) -> str:
        """Create an enrollment token through the API."""
        return str(self.enrollment(max_uses, labels)["token"])

    def enrollment(self, max_uses: int = 1, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create an enrollment token through the API; return the answer (token, enroll_command...)."""
        body: dict[str, Any] = self.call(
            "POST", "/enrollment-tokens", json={"max_uses": max_uses, "labels": labels or {}}
        )
        return body

    def upload(self, release: Release) -> None:
        """Publish a version through the hub's API, as a user would (the hub signs it)."""
        manifest = release.manifest.model_dump_json().encode()
        parts: list[tuple[str, tuple[str, bytes, str]]] = [
            ("manifest", ("manifest.json", manifest, "application/json"))
        ]
        for variant in release.manifest.variants:
            parts.append(("files", (variant.file, release.files[variant.sha256], "application/octet-stream")))
        self.call("POST", f"/models/{release.name}/versions", files=parts)

    def deploy(self, device_id: str, model: str, version: str, *, key: str | None = None) -> None:
        """Pin `model` at `version` on one device."""
        self.call("PUT", f"/devices/{device_id}/models/{model}", key=key, json={"version": version})

    def device(self, device_id: str) -> dict[str, Any]:
        """Return the hub's view of a device (GET /devices/{id})."""
        body: dict[str, Any] = self.call("GET", f"/devices/{device_id}")
        return body

    def reported(self, device_id: str, model: str) -> dict[str, Any]:
        """Return what the device last reported about `model` ({} before it reported)."""
        models: dict[str, Any] = (self.device(device_id).get("reported") or {}).get("models", {})
        return models.get(model) or {}

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
        args = ["worker", "--name", self.name, "--log-level", "info"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([*HUB_CLI, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
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
