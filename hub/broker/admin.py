"""Broker credentials and ACLs through mosquitto's dynamic-security plugin.

The hub never edits a password file and never restarts the broker to change who may
connect: `BrokerAdmin` sends dynamic-security commands over MQTT to
``$CONTROL/dynamic-security/v1``, so enrolling or decommissioning a device takes effect at
once without dropping anyone else, and it works the same against the embedded broker
and a remote mosquitto.

Roles (dynamic-security ACLs cannot use ``%u`` patterns, so every device gets its own):

    autodl-hub               the hub's user: everything, plus $CONTROL/dynamic-security
    autodl-device-{id}       publish  autodl/v1/devices/{id}/{reported,results,telemetry,online}
                             subscribe + receive autodl/v1/devices/{id}/{desired,commands}
    default ACL access       deny publish, subscribe and receive for anything not granted

A device subscribes to those exact topics; ``devices/{id}/#`` is refused by the broker,
and so are the release topics (agents learn versions from their desired state only, so
no device learns what other models the hub holds).

Client ids are bound to identities: a device's user carries ``clientid`` = its device id
(= its username), so the broker refuses a connection that presents another client id
with those credentials. No device can take over another device's connection or
persistent session, nor the hub's (whose client id is also not guessable: see
`hub.messaging.session.hub_client_id`). The binding is "client id = username", which a
password-file broker expresses with ``use_username_as_clientid``.

Against an external mosquitto (``--mqtt-url``) the same commands work once the hub's user
holds the ``autodl-hub`` role (`ensure_roles` + `set_hub_credentials` as the dynsec admin,
or ``python -m hub.broker.bootstrap``). Settings for external mosquitto, clusters and
EMQX: docs/mqtt-broker.md.

Errors::

    BrokerAdminError                    base
     ├── BrokerUnavailable              cannot connect, or no answer in time
     └── DynsecCommandError             the plugin refused a command (`.error` says why)
"""

from __future__ import annotations

import base64
import glob
import hashlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared import topics

__all__ = [
    "BrokerAdmin",
    "BrokerAdminError",
    "BrokerUnavailable",
    "DEVICE_ROLE_PREFIX",
    "DynsecCommandError",
    "HUB_ROLE",
    "MqttEndpoint",
    "default_acl_access",
    "device_role_acls",
    "device_role_name",
    "find_dynsec_plugin",
    "hash_password",
    "hub_role_acls",
    "verify_password",
    "write_hub_dynsec",
    "write_private",
]

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
HUB_ROLE = "autodl-hub"
DEVICE_ROLE_PREFIX = "autodl-device-"
# mosquitto verifies with the iteration count stored next to each hash.
PBKDF2_ITERATIONS = 1000


class BrokerAdminError(Exception):
    """Base of the broker administration errors."""


class BrokerUnavailable(BrokerAdminError):
    """The broker cannot be reached, or did not answer in time."""


class DynsecCommandError(BrokerAdminError):
    """The dynamic-security plugin refused a command."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynamic-security {command}: {error}")
        self.command = command
        self.error = error


@dataclass(frozen=True)
class MqttEndpoint:
    """Where an MQTT broker listens: parsed from ``mqtt://host:port`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        """Parse an ``mqtt://``, ``mqtts://`` or ``tcp://`` URL (or ``host:port``)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"not an MQTT URL: {url!r} (use mqtt://host:port or mqtts://host:port)")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> dict[str, Any]:
    """Return the dynamic-security fields for `password`: PBKDF2-SHA512, base64 hash and salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def verify_password(password: str, entry: Mapping[str, Any]) -> bool:
    """Return True if a dynamic-security client entry holds `password`."""
    try:
        salt = base64.b64decode(entry["salt"])
        expected = base64.b64decode(entry["password"])
        iterations = int(entry["iterations"])
    except (KeyError, TypeError, ValueError):
        return False
    actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected) or 64)
    return secrets.compare_digest(actual, expected)


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def device_role_name(device_id: str) -> str:
    """Return the name of the role that holds one device's ACL."""
    return DEVICE_ROLE_PREFIX + topics.validate_id(device_id, "device id")


def device_role_acls(device_id: str) -> list[dict[str, Any]]:
    """Return the ACL of one device: its own topics, nothing else."""
    acls = [_acl("publishClientSend", topics.device_topic(device_id, ch)) for ch in sorted(topics.DEVICE_TO_HUB)]
    readable = [topics.device_topic(device_id, ch) for ch in sorted(topics.HUB_TO_DEVICE)]
    for topic in readable:
        acls.append(_acl("subscribePattern", topic))
        acls.append(_acl("publishClientReceive", topic))
    return acls


def hub_role_acls() -> list[dict[str, Any]]:
    """Return the ACL of the hub's user: every topic, and the dynamic-security API."""
    # "#" does not match topics that start with "$", so $CONTROL and $SYS are listed.
    acls = [
        _acl(t, "#") for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
    ]
    for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern"):
        acls.append(_acl(acltype, "$CONTROL/dynamic-security/#"))
    acls += [_acl("publishClientReceive", "$SYS/#"), _acl("subscribePattern", "$SYS/#")]
    return acls


def default_acl_access() -> dict[str, bool]:
    """Return the default access for anything no role grants: deny all but unsubscribe."""
    return {"publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True}


def _acl_key(acl: Mapping[str, Any]) -> tuple[str, str, bool]:
    return (str(acl.get("acltype")), str(acl.get("topic")), bool(acl.get("allow")))


class BrokerAdmin:
    """A small MQTT client that manages users and roles with dynamic-security commands.

    Thread-safe: one command batch at a time. Connects on first use; call `close()` (or
    use it as a context manager) to disconnect.
    """

    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        *,
        timeout: float = 10.0,
        client_id: str | None = None,
        tls_ca_certs: str | None = None,
    ) -> None:
        self.endpoint = MqttEndpoint.parse(url)
        self.timeout = timeout
        self._username = username
        self._password = password
        self._client_id = client_id or f"autodl-hub-admin-{uuid.uuid4().hex[:12]}"
        self._tls_ca_certs = tls_ca_certs
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()  # one command batch in flight
        self._cond = threading.Condition()
        self._connected = False
        self._subscribed = False
        self._refused: str | None = None
        self._responses: dict[str, list[dict[str, Any]]] = {}
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: Any, url: str, password: str) -> BrokerAdmin:
        """Build an admin client for the hub's user from HubSettings, against `url`."""
        return cls(url, settings.mqtt_username, password)

    def __enter__(self) -> BrokerAdmin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- connection ---------------------------------------------------------------

    def _ensure_client(self) -> mqtt.Client:
        if self._client is not None:
            return self._client
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(self._username, self._password)
        if self.endpoint.tls:
            client.tls_set(ca_certs=self._tls_ca_certs)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30)
        client.loop_start()
        self._client = client
        return client

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            logger.error("broker refused the admin connection: %s", reason)
            return
        with self._cond:
            self._connected = True
            self._refused = None
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with self._cond:
            if reasons and reasons[0].is_failure:
                self._refused = f"subscribe to {RESPONSE_TOPIC}: {reasons[0]}"
            else:
                self._subscribed = True
            self._cond.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._connected = False
            self._subscribed = False
            self._cond.notify_all()
        logger.info("admin client disconnected: %s", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
            responses = body["responses"]
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable dynamic-security response: %r", message.payload[:200])
            return
        with self._cond:
            for response in responses:
                corr = response.get("correlationData") if isinstance(response, dict) else None
                if isinstance(corr, str) and corr.startswith(self._client_id):
                    self._responses.setdefault(corr.rsplit(":", 1)[0], []).append(response)
            self._cond.notify_all()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        with self._cond:
            self._connected = self._subscribed = False

    # -- commands -----------------------------------------------------------------

    def execute(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send a batch of dynamic-security commands and return their responses in order.

        Errors stay in the responses (``"error"`` key); use `run` to raise on them.
        """
        with self._lock:
            client = self._ensure_client()
            batch = f"{self._client_id}:{next(self._ids)}"
            sent = [{**cmd, "correlationData": f"{batch}:{i}"} for i, cmd in enumerate(commands)]
            with self._cond:
                ready = self._cond.wait_for(lambda: self._subscribed or self._refused is not None, self.timeout)
                if self._refused is not None:
                    raise BrokerUnavailable(f"broker at {self.endpoint.host}:{self.endpoint.port}: {self._refused}")
                if not ready:
                    raise BrokerUnavailable(
                        f"no MQTT connection to {self.endpoint.host}:{self.endpoint.port} after {self.timeout}s"
                    )
            info = client.publish(CONTROL_TOPIC, json.dumps({"commands": sent}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(f"publish to {CONTROL_TOPIC} failed: {mqtt.error_string(info.rc)}")
            with self._cond:
                done = self._cond.wait_for(lambda: len(self._responses.get(batch, [])) >= len(sent), self.timeout)
                got = self._responses.pop(batch, [])
            if not done:
                raise BrokerUnavailable(
                    f"no dynamic-security answer after {self.timeout}s (is the plugin loaded, may {self._username} use it?)"
                )
            got.sort(key=lambda r: int(str(r["correlationData"]).rsplit(":", 1)[1]))
            return got

    def run(self, command: dict[str, Any], *, ok_errors: Iterable[str] = ()) -> dict[str, Any]:
        """Run one command; raise DynsecCommandError unless it succeeded or failed with one of `ok_errors`."""
        (response,) = self.execute([command])
        error = response.get("error")
        if error and error not in set(ok_errors):
            raise DynsecCommandError(str(command.get("command")), str(error))
        return response

    def _ensure_role(self, rolename: str, acls: list[dict[str, Any]]) -> None:
        created = self.run(
            {"command": "createRole", "rolename": rolename, "acls": acls}, ok_errors=["Role already exists"]
        )
        if not created.get("error"):
            return
        # The role exists: add what is missing and drop what is extra, touching nothing else
        # (changing a role disconnects the clients that hold it).
        current = self.run({"command": "getRole", "rolename": rolename})["data"]["role"].get("acls", [])
        want = {_acl_key(a) for a in acls}
        have = {_acl_key(a) for a in current}
        for acltype, topic, _allow in sorted(have - want):
            self.run({"command": "removeRoleACL", "rolename": rolename, "acltype": acltype, "topic": topic})
        for acl in acls:
            if _acl_key(acl) not in have:
                self.run({"command": "addRoleACL", "rolename": rolename, **acl})

    def ensure_roles(self) -> None:
        """Create the hub's role and set deny-by-default access, if not done already."""
        self._ensure_role(HUB_ROLE, hub_role_acls())
        current = self.run({"command": "getDefaultACLAccess"})["data"]["acls"]
        want = default_acl_access()
        if {a["acltype"]: a["allow"] for a in current} != want:
            acls = [{"acltype": k, "allow": v} for k, v in want.items()]
            self.run({"command": "setDefaultACLAccess", "acls": acls})

    def set_hub_credentials(self, username: str, password: str) -> None:
        """Create or update the hub's user with the hub role (a changed password disconnects it)."""
        self._ensure_role(HUB_ROLE, hub_role_acls())
        self._upsert_client(username, password, HUB_ROLE)

    def add_device(self, device_id: str, password: str) -> None:
        """Let a device connect as `device_id` with `password`, limited to its own topics.

        Idempotent; for a device that exists already, the password is replaced (which
        disconnects its live session). Other clients stay connected.
        """
        role = device_role_name(device_id)
        self._ensure_role(role, device_role_acls(device_id))
        self._upsert_client(device_id, password, role, clientid=device_id)
        logger.info("broker: device %s may connect", device_id)

    def _upsert_client(self, username: str, password: str, role: str, *, clientid: str | None = None) -> None:
        create: dict[str, Any] = {"command": "createClient", "username": username, "password": password}
        create["roles"] = [{"rolename": role}]
        if clientid is not None:
            # Only a connection presenting this client id may log in as `username`.
            create["clientid"] = clientid
        created = self.run(create, ok_errors=["Client already exists"])
        if not created.get("error"):
            return
        client = self.run({"command": "getClient", "username": username})["data"]["client"]
        self.run({"command": "setClientPassword", "username": username, "password": password})
        if clientid is not None and client.get("clientid") != clientid:
            self.run({"command": "setClientId", "username": username, "clientid": clientid})
        if not any(r.get("rolename") == role for r in client.get("roles", [])):
            self.run({"command": "addClientRole", "username": username, "rolename": role})
        if client.get("disabled"):
            self.run({"command": "enableClient", "username": username})

    def remove_device(self, device_id: str) -> None:
        """Delete a device's user and role; the broker drops its live connection at once."""
        role = device_role_name(device_id)
        self.run({"command": "deleteClient", "username": device_id}, ok_errors=["Client not found"])
        self.run({"command": "deleteRole", "rolename": role}, ok_errors=["Role not found"])
        logger.info("broker: device %s removed", device_id)

    def list_devices(self) -> list[str]:
        """Return the device ids that have a device role on the broker."""
        roles = self.run({"command": "listRoles", "verbose": False})["data"]["roles"]
        return sorted(r[len(DEVICE_ROLE_PREFIX) :] for r in roles if str(r).startswith(DEVICE_ROLE_PREFIX))

    def reconcile(self, active_device_ids: Iterable[str]) -> list[str]:
        """Remove broker devices that are not in `active_device_ids`; return those removed.

        Run at hub start, so a device decommissioned while the broker was down is locked
        out anyway.
        """
        active = set(active_device_ids)
        removed = [device for device in self.list_devices() if device not in active]
        for device in removed:
            self.remove_device(device)
        return removed


# -- the dynamic-security file, for a broker that is not running ------------------

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


def find_dynsec_plugin() -> Path:
    """Return the dynamic-security plugin's path (``AUTODL_HUB_MOSQUITTO_PLUGIN`` overrides)."""
    override = os.environ.get("AUTODL_HUB_MOSQUITTO_PLUGIN")
    candidates = [Path(override)] if override else []
    candidates += [Path(d) / PLUGIN_NAME for d in _PLUGIN_DIRS]
    candidates += [Path(p) for p in sorted(glob.glob(f"/usr/lib/*/{PLUGIN_NAME}"))]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{PLUGIN_NAME} not found (looked in {', '.join(_PLUGIN_DIRS)}); install mosquitto 2.0+ "
        "or set AUTODL_HUB_MOSQUITTO_PLUGIN"
    )


def write_private(path: Path, text: str) -> None:
    """Write `text` beside `path` (0600), then rename: a crash never leaves half a file for mosquitto."""
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
    write_private(path, json.dumps(config, indent=1))
