"""The embedded broker: a mosquitto child process with dynamic security, supervised.

`EmbeddedBroker` writes ``mosquitto.conf`` and ``dynamic-security.json`` into
``<data_dir>/mosquitto/`` (the hub's user and role, deny-by-default ACL, no anonymous
access), starts mosquitto and restarts it with capped exponential backoff whenever it
dies. Devices are added and removed at runtime through `BrokerAdmin` (over MQTT), which
mosquitto saves back into the same JSON file, so they survive restarts.

Errors::

    BrokerError                 base
     └── BrokerStartError       mosquitto is missing, or exited / did not listen in time
"""

from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.broker.admin import (
    DEVICE_ROLE_PREFIX,
    HUB_ROLE,
    BrokerAdmin,
    BrokerAdminError,
    BrokerUnavailable,
    DynsecCommandError,
    MqttEndpoint,
    default_acl_access,
    device_role_acls,
    hash_password,
    hub_role_acls,
    verify_password,
)

__all__ = [
    "BrokerAdmin",
    "BrokerAdminError",
    "BrokerError",
    "BrokerStartError",
    "BrokerTls",
    "BrokerUnavailable",
    "DynsecCommandError",
    "EmbeddedBroker",
    "MqttEndpoint",
    "find_dynsec_plugin",
    "find_mosquitto",
    "load_or_create_hub_password",
    "write_hub_dynsec",
]

logger = logging.getLogger(__name__)

PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/usr/lib/mosquitto",
    "/opt/homebrew/lib",
)
PASSWORD_FILE = "hub-mqtt-password"


@dataclass(frozen=True)
class BrokerTls:
    """The certificate files of the broker's TLS listener (the hub's: `hub.tls`)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    certificate_port: int | None = None  # a second listener where devices log in with their certificate

    def config_lines(self) -> list[str]:
        """Return the listener options that turn it to TLS (they follow a ``listener`` line)."""
        lines = [f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.cafile.exists():  # an operator's publicly trusted certificate may come without one
            lines.insert(0, f"cafile {self.cafile}")
        return lines

    def certificate_listener(self, bind_host: str) -> list[str]:
        """Return the device-certificate listener: the certificate's CN is the username (so the
        device's ACL applies) and the client id (so no one takes over another's session), and
        revoked certificates (`crlfile`, re-read on SIGHUP) are refused."""
        if self.certificate_port is None:
            return []
        host = "" if bind_host in ("", "0.0.0.0") else f" {bind_host}"
        lines = [f"listener {self.certificate_port}{host}", *self.config_lines()]
        lines += ["require_certificate true", "use_identity_as_username true", "use_username_as_clientid true"]
        return lines + ([f"crlfile {self.crlfile}"] if self.crlfile is not None else [])


class BrokerError(Exception):
    """Base of the embedded-broker errors."""


class BrokerStartError(BrokerError):
    """mosquitto could not be started."""


def find_mosquitto() -> str:
    """Return the mosquitto binary's path, or raise BrokerStartError saying how to install it."""
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)
    if found is None:
        raise BrokerStartError("mosquitto is not installed: `apt-get install mosquitto` (2.0 or newer)")
    return found


def find_dynsec_plugin() -> Path:
    """Return the dynamic-security plugin's path (``AUTODL_HUB_MOSQUITTO_PLUGIN`` overrides)."""
    override = os.environ.get("AUTODL_HUB_MOSQUITTO_PLUGIN")
    candidates = [Path(override)] if override else []
    candidates += [Path(d) / PLUGIN_NAME for d in _PLUGIN_DIRS]
    candidates += [Path(p) for p in sorted(glob.glob(f"/usr/lib/*/{PLUGIN_NAME}"))]
    for path in candidates:
        if path.is_file():
            return path
    raise BrokerStartError(
        f"{PLUGIN_NAME} not found (looked in {', '.join(_PLUGIN_DIRS)}); install mosquitto 2.0+ "
        "or set AUTODL_HUB_MOSQUITTO_PLUGIN"
    )


def load_or_create_hub_password(directory: Path) -> str:
    """Return the hub's MQTT password kept in `directory`, creating a random one (0600) if absent."""
    path = directory / PASSWORD_FILE
    if path.exists():
        return path.read_text().strip()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _write_private(path: Path, text: str) -> None:
    # Write beside, then rename: a crash never leaves half a config for mosquitto to read.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_hub_dynsec(path: Path, username: str, password: str) -> None:
    """Create or update a dynamic-security file with the hub's user and role and default-deny access.

    Device users and roles already in the file are kept, each bound to its client id
    (= its username). Only for a broker that is not
    running: mosquitto rewrites the file itself while it runs.
    """
    config: dict[str, Any] = {}
    if path.exists():
        try:
            config = json.loads(path.read_text())
        except ValueError as exc:
            # Keep the broken file for inspection; the hub re-adds devices as they re-enroll.
            backup = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, backup)
            logger.error("dynamic-security file unreadable (%s), moved to %s", exc, backup)
            config = {}
    clients: list[dict[str, Any]] = config.setdefault("clients", [])
    roles: list[dict[str, Any]] = config.setdefault("roles", [])
    config.setdefault("groups", [])
    hub = next((c for c in clients if c.get("username") == username), None)
    if hub is None:
        hub = {"username": username, "textName": "autodl hub", "roles": []}
        clients.append(hub)
    if not verify_password(password, hub):
        hub.update(hash_password(password))
    hub.pop("disabled", None)
    if not any(r.get("rolename") == HUB_ROLE for r in hub.setdefault("roles", [])):
        hub["roles"].append({"rolename": HUB_ROLE})
    role = next((r for r in roles if r.get("rolename") == HUB_ROLE), None)
    if role is None:
        role = {"rolename": HUB_ROLE}
        roles.append(role)
    role["acls"] = hub_role_acls()
    for client in clients:
        # Devices enrolled before client ids were bound get the binding now (client id = username).
        if any(str(r.get("rolename", "")).startswith(DEVICE_ROLE_PREFIX) for r in client.get("roles", [])):
            client["clientid"] = client.get("username")
    for device_role in roles:
        # And their roles today's ACL (no release topics since "Hardening").
        name = str(device_role.get("rolename", ""))
        if name.startswith(DEVICE_ROLE_PREFIX):
            try:
                device_role["acls"] = device_role_acls(name[len(DEVICE_ROLE_PREFIX) :])
            except ValueError:
                logger.warning("dynamic-security role %s does not name a valid device id; left as it is", name)
    config["defaultACLAccess"] = default_acl_access()
    _write_private(path, json.dumps(config, indent=1))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """mosquitto with dynamic security, run as a child of the hub and restarted if it dies."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int,
        hub_username: str,
        hub_password: str,
        bind_host: str = "0.0.0.0",
        autosave_interval_s: int = 5,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        start_timeout_s: float = 10.0,
        extra_config: str = "",
        tls: BrokerTls | None = None,
    ) -> None:
        self.directory = directory
        self.tls = tls
        self.port = port
        self.bind_host = bind_host
        self.hub_username = hub_username
        self._hub_password = hub_password
        self.autosave_interval_s = autosave_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.start_timeout_s = start_timeout_s
        self.extra_config = extra_config
        self.config_path = directory / "mosquitto.conf"
        self.dynsec_path = directory / "dynamic-security.json"
        self.log_path = directory / "mosquitto.log"
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> EmbeddedBroker:
        """Build the broker for HubSettings: ``<data_dir>/mosquitto``, `mqtt_port`, the hub's user,
        listening where the hub's HTTP does, with TLS when the hub's settings say so."""
        directory = Path(settings.data_dir) / "mosquitto"
        password = settings.mqtt_password or load_or_create_hub_password(directory)
        tls = None
        if settings.mqtt_tls:
            own_ca = settings.tls_ca_key.exists()  # device certificates need the hub's own CA
            port = settings.mtls_port if own_ca else None
            tls = BrokerTls(settings.tls_ca, settings.tls_cert, settings.tls_key, settings.tls_crl, port)
        kwargs.setdefault("bind_host", settings.host)
        return cls(
            directory,
            port=settings.mqtt_port,
            hub_username=settings.mqtt_username,
            hub_password=password,
            tls=tls,
            **kwargs,
        )

    @property
    def connect_host(self) -> str:
        """Return the address local clients use (loopback when bound to every interface)."""
        return "127.0.0.1" if self.bind_host in ("", "0.0.0.0", "::") else self.bind_host

    @property
    def url(self) -> str:
        """Return ``mqtt://host:port`` (``mqtts://`` with TLS) for clients on this machine."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.connect_host}:{self.port}"

    @property
    def ca_certs(self) -> str | None:
        """Return the CA file clients on this machine verify the broker with (None: plain, or the system's)."""
        return str(self.tls.cafile) if self.tls is not None and self.tls.cafile.exists() else None

    @property
    def hub_password(self) -> str:
        """Return the password of the hub's user."""
        return self._hub_password

    @property
    def pid(self) -> int | None:
        """Return the running mosquitto's process id, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Return True while mosquitto is alive."""
        return self.pid is not None

    def admin(self, **kwargs: Any) -> BrokerAdmin:
        """Return a BrokerAdmin logged in as the hub's user on this broker."""
        kwargs.setdefault("tls_ca_certs", self.ca_certs)
        return BrokerAdmin(self.url, self.hub_username, self._hub_password, **kwargs)

    # -- configuration ------------------------------------------------------------

    def render_config(self) -> str:
        """Return the mosquitto.conf text."""
        listener = (
            f"listener {self.port}" if self.bind_host in ("", "0.0.0.0") else f"listener {self.port} {self.bind_host}"
        )
        lines = [
            "# Written by autodl-hub at every start; edits are overwritten (use extra_config).",
            "per_listener_settings false",
            "allow_anonymous false",
            listener,
            *(self.tls.config_lines() if self.tls is not None else []),
            "persistence true",
            f"persistence_location {self.directory}/",
            f"autosave_interval {self.autosave_interval_s}",
            # The hub's persistent session buffers telemetry while the hub restarts.
            "max_queued_messages 100000",
            "max_packet_size 1048576",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"plugin {find_dynsec_plugin()}",
            f"plugin_opt_config_file {self.dynsec_path}",
        ]
        if self.tls is not None:
            lines += self.tls.certificate_listener(self.bind_host)
        if os.name == "posix" and os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to "mosquitto", who cannot read the data dir
        return "\n".join(lines) + "\n" + self.extra_config + ("\n" if self.extra_config else "")

    def _prepare_dynsec(self) -> None:
        """Create or update the dynamic-security file: the hub's user and role, default deny."""
        write_hub_dynsec(self.dynsec_path, self.hub_username, self._hub_password)

    # -- process ------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start mosquitto, wait until it listens, and begin supervising it."""
        if self._supervisor is not None and self._supervisor.is_alive():
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        _write_private(self.config_path, self.render_config())
        self._prepare_dynsec()
        self._stopping.clear()
        try:
            self._spawn()
        except BrokerStartError:
            self._kill_current()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="mosquitto-supervisor", daemon=True)
        self._supervisor.start()
        logger.info("embedded mosquitto listening on %s:%s (pid %s)", self.bind_host, self.port, self.pid)

    def _spawn(self, *, restart: bool = False) -> None:
        if _port_open(self.connect_host, self.port):
            # Checked first: once ours runs, "something listens" could not tell it from the squatter.
            raise BrokerStartError(f"port {self.port} is in use by another process; mosquitto cannot listen there")
        with self._lock:
            if self._stopping.is_set():
                return
            log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps the descriptor
            try:
                proc = subprocess.Popen(
                    [find_mosquitto(), "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C to the hub's terminal reaches the hub only
                )
            finally:
                log.close()
            self._proc = proc
            if restart:
                self.restarts += 1
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerStartError(f"mosquitto exited with {proc.returncode}: {self._log_tail()}")
            if _port_open(self.connect_host, self.port):
                return
            time.sleep(0.05)
        raise BrokerStartError(f"mosquitto does not listen on port {self.port} after {self.start_timeout_s}s")

    def _log_tail(self, limit: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def _supervise(self) -> None:
        backoff = self.backoff_min_s
        while not self._stopping.is_set():
            proc = self._proc
            started = time.monotonic()
            if proc is not None:
                code = proc.wait()
                if self._stopping.is_set():
                    return
                logger.error("mosquitto exited with %s; restarting in %.1fs: %s", code, backoff, self._log_tail(500))
                if time.monotonic() - started > 60:
                    backoff = self.backoff_min_s  # it ran fine for a while: not a crash loop
            if self._stopping.wait(backoff):
                return
            try:
                self._spawn(restart=True)
                logger.warning("mosquitto restarted (pid %s, restart %d)", self.pid, self.restarts)
            except (BrokerStartError, OSError) as exc:
                logger.error("mosquitto restart failed: %s", exc)
                self._kill_current()
            backoff = min(backoff * 2, self.backoff_max_s)

    def _kill_current(self) -> None:
        with self._lock:
            failed, self._proc = self._proc, None
        if failed is not None and failed.poll() is None:
            failed.kill()
            failed.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop supervising and end mosquitto cleanly (it saves retained messages and sessions)."""
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto did not stop in %ss; killing it", timeout)
                proc.kill()
                proc.wait()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.join(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_restarted(self, previous_pid: int, timeout: float = 30.0) -> bool:
        """Block until a mosquitto other than `previous_pid` listens; return False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid
            if pid is not None and pid != previous_pid and _port_open(self.connect_host, self.port):
                return True
            time.sleep(0.05)
        return False
