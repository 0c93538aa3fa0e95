"""Broker users in a mosquitto password file, ACLs as ``%u`` patterns, reloaded in batches.

The embedded broker's authentication (`hub.broker.embedded.EmbeddedBroker`): what a
device may do is one static ACL file of ``pattern`` lines keyed on the username (= the
device id), the same for 10 or 10,000 devices, and who may connect is one line per
device in mosquitto's password file (``$7$`` PBKDF2-SHA512, the format ``mosquitto_passwd``
writes). Enrolling a device adds its line, decommissioning removes it, and mosquitto
reloads both files on SIGHUP.

Group commit: changes that arrive while a reload is being made wait for the next one,
so N enrollments arriving together cost one file write and one reload, not N. A change
returns only once the broker has reloaded with it: after each SIGHUP the writer logs in
as a probe user whose password is new in every write, and the broker accepting it
proves it runs with that file (an enrollment's answer can be used at once). On reload
mosquitto checks every connected client against the new file and disconnects one whose
user is gone, so decommissioning drops a device's live connection (mosquitto 2.0.11
drops only the first such client of a reload, so a batch holds at most one removal).

Cost: the hub's part of a change does not depend on the fleet (one hash, one dict
entry). mosquitto's reload reads the whole file and re-checks each connected client's
password, so it grows with the fleet; the writer waits nine times as long as the last
reload cost the broker (its CPU time) before the next one, so reloads take at most a
tenth of its time (`reload_share`): a larger fleet makes larger batches instead of more
reloads, and the broker's time per enrollment stays under `reload_share` / (enrollments
per second).

Device passwords are the hub's 256-bit random secrets (`hub.security.new_secret`), so
key stretching adds nothing to them, while every reload re-hashes every connected
device's password: they are stored with `DEVICE_ITERATIONS` (1) PBKDF2 round. The hub's
own password may be an operator's choice and gets `HUB_ITERATIONS`.

Client ids are bound to users by ``use_username_as_clientid`` on each listener (see
`LISTENER_AUTH_LINES`): whatever client id a device sends, its session is its username's,
so no device can take over another device's connection or session, nor the hub's.

mosquitto 2.0's ACL file does not check SUBSCRIBE (``security_default.c``: "FIXME -
implement ACL subscription strings"): a device may subscribe to any filter, but a
message, retained or live, reaches it only when the ``read`` patterns allow its topic,
so another device's topics deliver nothing.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hub.broker.admin import BrokerUnavailable, write_private
from shared import topics
from shared.topics import DeviceChannel

__all__ = [
    "DEVICE_ITERATIONS",
    "HUB_ITERATIONS",
    "LISTENER_AUTH_LINES",
    "PROBE_USERNAME",
    "PasswordFileUsers",
    "hash_password",
    "read_password_file",
    "render_acl",
    "verify_password",
]

logger = logging.getLogger(__name__)

DEVICE_ITERATIONS = 1
HUB_ITERATIONS = 1000
SALT_BYTES = 12  # mosquitto refuses another salt length
# Not a valid device id (leading "."), so no device can ever be given this name.
PROBE_USERNAME = ".autodl-reload-probe"
# Every listener that authenticates devices carries these (mosquitto reads them per listener).
LISTENER_AUTH_LINES = ("use_username_as_clientid true",)


def hash_password(password: str, iterations: int = DEVICE_ITERATIONS) -> str:
    """Return `password` as mosquitto's password file stores it: ``$7$iterations$salt$hash``."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Return True if a ``$7$`` password-file hash holds `password`."""
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    except ValueError:
        return False
    return kind == "7" and secrets.compare_digest(actual, expected)


def render_acl(hub_username: str) -> str:
    """Return the ACL file: the hub may do anything, each device only its own topics (``%u``)."""
    lines = [
        "# Written by autodl-hub at every start (hub.broker.passwd); edits are overwritten.",
        f"user {hub_username}",
        "topic readwrite #",
        "topic read $SYS/#",
        "",
        "# Every other user is a device whose username is its device id.",
    ]
    own = f"{topics.ROOT}/devices/%u"  # topics.device_prefix with the username for the id
    lines += [f"pattern write {own}/{DeviceChannel(ch).value}" for ch in sorted(topics.DEVICE_TO_HUB)]
    lines += [f"pattern read {own}/{DeviceChannel(ch).value}" for ch in sorted(topics.HUB_TO_DEVICE)]
    return "\n".join(lines) + "\n"


def read_password_file(path: Path) -> dict[str, str]:
    """Return username -> hash of a mosquitto password file (empty when there is none)."""
    users: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return users
    for line in text.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        username, encoded = line.split(":", 1)
        users[username.strip()] = encoded.strip()
    return users


def _mqtt_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def mqtt_login(
    host: str, port: int, username: str, password: str, timeout: float = 2.0, tls: ssl.SSLContext | None = None
) -> int:
    """Log in with MQTT 3.1.1 (clean session) and disconnect; return the CONNACK code (0: accepted).

    `tls`: the context of a TLS listener. Raises OSError when nothing answers.
    """
    variable = _mqtt_string("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack("!H", 10)
    body = variable + _mqtt_string(username) + _mqtt_string(username) + _mqtt_string(password)
    length, encoded = len(body), b""
    while True:
        digit, length = length % 128, length // 128
        encoded += bytes([digit | (0x80 if length else 0)])
        if not length:
            break
    with socket.create_connection((host, port), timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        sock.sendall(b"\x10" + encoded + body)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError("the broker closed the connection before CONNACK")
            answer += chunk
        if answer[0] != 0x20:
            raise ConnectionError(f"not a CONNACK: {answer!r}")
        if answer[3] == 0:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return answer[3]


@dataclass
class _Change:
    """One device's login added, replaced or (``encoded`` None) removed; `done` once live or failed."""

    device_id: str
    encoded: str | None
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class PasswordFileUsers:
    """The broker's users: a password file written in batches, each made live by a reload.

    `reload` asks the broker to re-read its files (SIGHUP) and returns False when no broker
    runs (one that starts later reads the files anyway). Implements what enrollment,
    decommissioning and the hub's start need (`add_device`, `remove_device`, `reconcile`).
    Thread-safe; a writer thread makes the batches.

    A batch takes every new login waiting, but at most one change that must disconnect a
    connected device (a removal, a replaced password): mosquitto 2.0.11 drops only the first
    such client of a reload and leaves the others connected (tests/hub/broker).
    """

    def __init__(
        self,
        password_file: Path,
        *,
        hub_username: str,
        hub_password: str,
        reload: Callable[[], bool],
        host: str,
        port: int,
        timeout: float = 30.0,
        min_interval_s: float = 0.02,
        reload_share: float = 0.1,
        broker_cpu_s: Callable[[], float | None] = lambda: None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.password_file = password_file
        self.hub_username = hub_username
        self._hub_password = hub_password
        self._reload = reload
        self.host = host
        self.port = port
        self.timeout = timeout
        self.min_interval_s = min_interval_s
        self.reload_share = reload_share
        self._broker_cpu_s = broker_cpu_s  # the broker's CPU seconds so far (None: unknown)
        self._tls = tls  # the probe's TLS context when the broker's listener is TLS
        self._cond = threading.Condition()
        self._devices: dict[str, str] = {}  # as written to the file
        self._queue: list[_Change] = []
        self._hub_entry = ""
        self._stopping = False
        self._writer: threading.Thread | None = None
        self.reloads = 0
        self.last_reload_s = 0.0

    # -- files --------------------------------------------------------------------

    def load(self, migrate: Mapping[str, str] | None = None) -> None:
        """Read the devices from the password file, add `migrate`'s, and write it with the hub's user.

        For a broker that is not running yet (EmbeddedBroker.start).
        """
        users = read_password_file(self.password_file)
        old_hub = users.pop(self.hub_username, "")
        users.pop(PROBE_USERNAME, None)
        for username, encoded in (migrate or {}).items():
            users.setdefault(username, encoded)
        with self._cond:
            self._devices = users
            keep = old_hub if verify_password(self._hub_password, old_hub) else ""
            self._hub_entry = keep or hash_password(self._hub_password, HUB_ITERATIONS)
            self._write(secrets.token_urlsafe(24))

    def _write(self, probe_password: str) -> None:
        lines = [f"{self.hub_username}:{self._hub_entry}", f"{PROBE_USERNAME}:{hash_password(probe_password)}"]
        lines += [f"{username}:{encoded}" for username, encoded in self._devices.items()]
        write_private(self.password_file, "\n".join(lines) + "\n")

    # -- changes ------------------------------------------------------------------

    def add_device(self, device_id: str, password: str) -> None:
        """Let `device_id` log in with `password`; return once the broker accepts it.

        Replacing a device's password disconnects its live session at the reload.
        """
        encoded = hash_password(password)  # outside the lock: hashing in parallel
        self._apply([_Change(topics.validate_id(device_id, "device id"), encoded)])
        logger.debug("broker: device %s may connect", device_id)

    def remove_device(self, device_id: str) -> None:
        """Remove a device's login; return once the broker has dropped it (and its live connection)."""
        self._apply([_Change(device_id, None)])
        logger.info("broker: device %s removed", device_id)

    def list_devices(self) -> list[str]:
        """Return the device ids that may log in (or will, once the changes waiting are made)."""
        with self._cond:
            devices = set(self._devices)
            for change in self._queue:
                (devices.add if change.encoded is not None else devices.discard)(change.device_id)
            return sorted(devices)

    def reconcile(self, active_device_ids: Iterable[str]) -> list[str]:
        """Remove the logins of devices not in `active_device_ids`; return them."""
        active = set(active_device_ids)
        removed = [d for d in self.list_devices() if d not in active]
        if removed:
            self._apply([_Change(d, None) for d in removed])
        return removed

    def _apply(self, changes: list[_Change]) -> None:
        with self._cond:
            self._queue.extend(changes)
            self._ensure_writer()
            self._cond.notify_all()
        deadline = time.monotonic() + self.timeout
        for change in changes:
            if not change.done.wait(max(0.0, deadline - time.monotonic())):
                raise BrokerUnavailable(f"the broker did not take the change in {self.timeout}s")
            if change.error is not None:
                raise BrokerUnavailable(f"the broker did not take the change: {change.error}")

    def _ensure_writer(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._run, name="broker-passwd-writer", daemon=True)
            self._writer.start()

    def _take_batch(self) -> list[_Change]:
        """Move the next batch from the queue into `_devices` (under the lock)."""
        batch: list[_Change] = []
        waiting: list[_Change] = []
        held: set[str] = set()  # devices with an earlier change left for a later batch: keep their order
        kicks = False
        for change in self._queue:
            kicking = change.device_id in self._devices
            if change.device_id in held or (kicking and kicks):
                held.add(change.device_id)
                waiting.append(change)
                continue
            kicks = kicks or kicking
            if change.encoded is None:
                self._devices.pop(change.device_id, None)
            else:
                self._devices[change.device_id] = change.encoded
            batch.append(change)
        self._queue = waiting
        return batch

    def _run(self) -> None:
        next_at = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or bool(self._queue))
                if self._stopping:
                    return
            # Let changes gather while the broker recovers from the last reload.
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            probe_password = secrets.token_urlsafe(24)
            with self._cond:
                batch = self._take_batch()
                try:
                    self._write(probe_password)
                    error = None
                except OSError as exc:
                    error = f"cannot write {self.password_file}: {exc}"
            started, cpu_before = time.monotonic(), self._broker_cpu_s()
            if error is None:
                error = self._make_live(probe_password)
            took, cpu_after = time.monotonic() - started, self._broker_cpu_s()
            # What the reload cost the broker: its CPU time if known (on a busy machine the wall
            # time is mostly waiting for a core), else the wall time.
            cost = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else took
            next_at = time.monotonic() + max(self.min_interval_s, cost * (1 - self.reload_share) / self.reload_share)
            if error is None:
                self.reloads += 1
                self.last_reload_s = took
            else:
                logger.error("broker reload failed: %s", error)
            for change in batch:
                change.error = error
                change.done.set()

    def _make_live(self, probe_password: str) -> str | None:
        """SIGHUP the broker, then log in as the probe until it is accepted; return an error or None."""
        deadline = time.monotonic() + self.timeout
        signalled = self._reload()
        last = "the broker is not running"
        pause = 0.001
        while time.monotonic() < deadline:
            try:
                code = mqtt_login(self.host, self.port, PROBE_USERNAME, probe_password, tls=self._tls)
            except OSError as exc:
                code, last = -1, f"cannot log in to {self.host}:{self.port}: {exc}"
            if code == 0:
                return None
            if code > 0:
                last = f"the broker refused the new file's probe (CONNACK {code})"
            if not signalled:
                signalled = self._reload()
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return last

    def close(self) -> None:
        """Stop the writer thread (changes it has not made fail; the file keeps those it wrote)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join(timeout=self.timeout + 5)
        with self._cond:
            for change in self._queue:
                change.error = "the broker is stopping"
                change.done.set()
            self._queue = []
            self._stopping = False

    def __enter__(self) -> PasswordFileUsers:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
