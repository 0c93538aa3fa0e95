"""The embedded broker: a mosquitto child process with a password file and pattern ACLs, supervised.

`EmbeddedBroker` writes ``mosquitto.conf``, ``acl`` and ``passwd`` into
``<data_dir>/mosquitto/`` (the hub's user with full access, every other user a device
limited to its own topics by ``%u`` patterns, no anonymous access), starts mosquitto and
restarts it with capped exponential backoff whenever it dies. Devices are added and
removed at runtime through `EmbeddedBroker.users` (`hub.broker.passwd.PasswordFileUsers`:
the password file, reloaded by SIGHUP in batches), so they survive restarts. A data dir
from before (devices in ``dynamic-security.json``) is migrated at start.

``auth="dynsec"`` runs it with the dynamic-security plugin instead, managed over MQTT by
`BrokerAdmin` (`admin()`), as an external mosquitto is: the tests use it to stand for one.

Errors::

    BrokerError                 base
     └── BrokerStartError       mosquitto is missing, or exited / did not listen in time
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from hub.broker.admin import (
    DEVICE_ROLE_PREFIX,
    BrokerAdmin,
    BrokerAdminError,
    BrokerUnavailable,
    DynsecCommandError,
    MqttEndpoint,
    find_dynsec_plugin,
    write_hub_dynsec,
    write_private,
)
from hub.broker.passwd import LISTENER_AUTH_LINES, PasswordFileUsers, render_acl

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
    "migrate_dynsec_devices",
    "write_hub_dynsec",
]

logger = logging.getLogger(__name__)

# "passwd": the password file and %u pattern ACLs (hub.broker.passwd), the default.
# "dynsec": mosquitto's dynamic-security plugin managed over MQTT (BrokerAdmin), as an
# external mosquitto runs it; the tests use it to stand for one.
AuthMode = Literal["passwd", "dynsec"]

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


def migrate_dynsec_devices(path: Path) -> dict[str, str]:
    """Return the devices of a dynamic-security file as password-file hashes, and set the file aside.

    The plugin stores PBKDF2-SHA512 with a 12-byte salt and a 64-byte hash, exactly what
    a ``$7$`` password-file line holds, so enrolled devices keep their passwords.
    """
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        logger.error("dynamic-security file %s unreadable (%s); its devices must enroll again", path, exc)
        config = {}
    devices: dict[str, str] = {}
    for client in config.get("clients", []) if isinstance(config, dict) else []:
        roles = [str(r.get("rolename", "")) for r in client.get("roles", []) if isinstance(r, dict)]
        if not any(r.startswith(DEVICE_ROLE_PREFIX) for r in roles):
            continue
        try:
            salt, digest = base64.b64decode(client["salt"]), base64.b64decode(client["password"])
            iterations = int(client["iterations"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            logger.warning("dynamic-security client %s has no usable password; not migrated", client.get("username"))
            continue
        if len(salt) == 12 and len(digest) == 64 and iterations > 0:
            devices[str(client["username"])] = f"$7${iterations}${client['salt']}${client['password']}"
    os.replace(path, path.with_name(f"{path.name}.migrated"))
    logger.warning("moved %d devices from %s to the password file", len(devices), path)
    return devices


def _probe_tls() -> ssl.SSLContext:
    """Return the TLS context of the hub's own probe logins on this machine: the broker is its child,
    and the probe's throwaway password grants nothing, so an operator's certificate need not name loopback."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """mosquitto with a password file and pattern ACLs, run as a child of the hub and restarted if it dies."""

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
        auth: AuthMode = "passwd",
    ) -> None:
        self.directory = directory
        self.tls = tls
        self.auth = auth
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
        self.dynsec_path = directory / "dynamic-security.json"  # before the password file: migrated at start
        self.password_path = directory / "passwd"
        self.acl_path = directory / "acl"
        self.log_path = directory / "mosquitto.log"
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._listening = False  # the current mosquitto has opened its port (and so handles SIGHUP)
        self.users = PasswordFileUsers(
            self.password_path,
            hub_username=hub_username,
            hub_password=hub_password,
            reload=self.reload,
            host=self.connect_host,
            port=port,
            broker_cpu_s=self.cpu_seconds,
            tls=_probe_tls() if tls is not None else None,
        )
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

    def admin(self) -> PasswordFileUsers | BrokerAdmin:
        """Return what adds and removes this broker's devices: `users`, or a dynsec client."""
        if self.auth == "dynsec":
            return BrokerAdmin(self.url, self.hub_username, self._hub_password, tls_ca_certs=self.ca_certs)
        return self.users

    def cpu_seconds(self) -> float | None:
        """Return the CPU seconds the running mosquitto has used, or None."""
        pid = self.pid
        if pid is None:
            return None
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system)

    def reload(self) -> bool:
        """Ask mosquitto to re-read its password and ACL files (SIGHUP); False when none is listening."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or not self._listening:
                return False
            # Only once it listens: before its handler is installed, SIGHUP would end mosquitto.
            proc.send_signal(signal.SIGHUP)
            return True

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
            *(LISTENER_AUTH_LINES if self.auth == "passwd" else ()),  # authentication (see _auth_config)
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
        ]
        lines += self._auth_config()
        if self.tls is not None:
            lines += self.tls.certificate_listener(self.bind_host)
        if os.name == "posix" and os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to "mosquitto", who cannot read the data dir
        return "\n".join(lines) + "\n" + self.extra_config + ("\n" if self.extra_config else "")

    # -- authentication: password file + %u pattern ACLs (hub.broker.passwd) -------

    def _auth_config(self) -> list[str]:
        """Return the global lines of the broker's authentication.

        Every listener that devices log in on must also carry `LISTENER_AUTH_LINES` right
        after its ``listener`` line (mosquitto reads ``use_username_as_clientid`` per
        listener): that binds a session to its username, the device id. A listener with
        ``use_identity_as_username`` (certificate CN = device id) gets the same ACL.
        """
        if self.auth == "dynsec":
            return [f"plugin {find_dynsec_plugin()}", f"plugin_opt_config_file {self.dynsec_path}"]
        return [
            "# Authentication: devices in the password file, reloaded by SIGHUP; ACLs keyed on %u.",
            f"password_file {self.password_path}",
            f"acl_file {self.acl_path}",
        ]

    def _prepare_auth(self) -> None:
        """Write the ACL file and the password file (the hub's user, devices kept or migrated)."""
        if self.auth == "dynsec":
            write_hub_dynsec(self.dynsec_path, self.hub_username, self._hub_password)
            return
        write_private(self.acl_path, render_acl(self.hub_username))
        self.users.load(migrate=migrate_dynsec_devices(self.dynsec_path))

    # -- end of authentication ------------------------------------------------------

    # -- process ------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start mosquitto, wait until it listens, and begin supervising it."""
        if self._supervisor is not None and self._supervisor.is_alive():
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        write_private(self.config_path, self.render_config())
        self._prepare_auth()
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
            self._listening = False
            if restart:
                self.restarts += 1
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerStartError(f"mosquitto exited with {proc.returncode}: {self._log_tail()}")
            if _port_open(self.connect_host, self.port):
                with self._lock:
                    self._listening = self._proc is proc
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
        self.users.close()
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
