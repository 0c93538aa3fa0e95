"""A small stand-in for the hub's HTTP API (enroll, manifests, artifacts with Range), for agent tests.

It follows the contract in shared/ and the agreed interfaces; the real hub is exercised in tests/e2e.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from shared import topics
from shared.codec import encode
from shared.keys import KeyChain
from shared.manifest import public_key_b64
from shared.messages import DesiredModel, DesiredState, EnrollRequest, EnrollResponse
from tests.support.models import Release

DEVICE_TOKEN = "device-token-0123456789abcdef"


class HubStub:
    """Serves enrollment, signed manifests and artifacts; can hold a transfer midway."""

    def __init__(self, mqtt_host: str = "127.0.0.1", mqtt_port: int = 1883) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.artifacts: dict[str, bytes] = {}
        self.enroll_tokens = {"good-token"}
        self.chain: tuple[int, KeyChain | None] | None = None  # GET /signing-keys: status and body (None: 404)
        self.device_token = DEVICE_TOKEN  # the bearer token its GETs need (a real device's: a stand-in for its hub)
        self.enrolled: list[EnrollRequest] = []
        self.ranges: list[str | None] = []  # Range header of every artifact request
        self.hold_after: int | None = None  # stop sending after this many bytes, until released
        self.trickle = False  # while held, keep sending a little (so the client sees progress)
        self.released = threading.Event()
        self.holding = threading.Event()
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()

    def publish(self, release: Release, *, pin: bool = False) -> DesiredModel:
        """Serve a release; return the desired-state entry pointing at it (`pin`: with the manifest's sha256,
        as the real hub's desired state names it)."""
        signed = release.signed.to_bytes()
        self.manifests[(release.name, release.version)] = signed
        self.artifacts.update(release.files)
        return DesiredModel(
            version=release.version,
            manifest_url=self.manifest_url(release.name, release.version),
            manifest_sha256=hashlib.sha256(signed).hexdigest() if pin else None,
        )

    def manifest_url(self, name: str, version: str) -> str:
        return f"{self.url}/models/{name}/versions/{version}/manifest"

    def enroll_response(self, device_id: str) -> EnrollResponse:
        return EnrollResponse(
            device_id=device_id,
            device_token=DEVICE_TOKEN,
            mqtt_host=self.mqtt_host,
            mqtt_port=self.mqtt_port,
            mqtt_username=device_id,
            mqtt_password="secret",
            signing_public_key=public_key_b64(self.key),
            hub_url=self.url,
        )


def _make_handler(hub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _json(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/enroll":
                return self._json(404, {"detail": "not found"})
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            request = EnrollRequest.model_validate_json(raw)
            if request.token not in hub.enroll_tokens:
                return self._json(401, {"detail": "invalid enrollment token"})
            hub.enrolled.append(request)
            device_id = f"dev-{len(hub.enrolled)}"
            self._json(200, hub.enroll_response(device_id).model_dump(mode="json"))

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("Authorization") != f"Bearer {hub.device_token}":
                return self._json(401, {"detail": "bad token"})
            if m := re.fullmatch(r"/models/([^/]+)/versions/([^/]+)/manifest", self.path):
                data = hub.manifests.get((m.group(1), m.group(2)))
                if data is None:
                    return self._json(404, {"detail": "no such version"})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if m := re.fullmatch(r"/artifacts/([0-9a-f]{64})", self.path):
                return self._artifact(m.group(1))
            if self.path == "/signing-keys" and hub.chain is not None:
                code, chain = hub.chain
                return self._json(code, chain.model_dump(mode="json") if chain is not None else {"detail": "down"})
            return self._json(404, {"detail": "not found"})

        def _artifact(self, sha: str) -> None:
            data = hub.artifacts.get(sha)
            header = self.headers.get("Range")
            with hub.lock:
                hub.ranges.append(header)
            if data is None:
                return self._json(404, {"detail": "no such artifact"})
            start = 0
            if header and (m := re.fullmatch(r"bytes=(\d+)-", header)):
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            body = data[start:]
            if hub.hold_after is not None and start < hub.hold_after:
                first = hub.hold_after - start
                self.wfile.write(body[:first])
                self.wfile.flush()
                hub.holding.set()
                if hub.trickle:
                    sent = first
                    while not hub.released.wait(0.01) and sent < len(body):
                        try:
                            self.wfile.write(body[sent : sent + 512])
                            self.wfile.flush()
                        except OSError:
                            return None
                        sent += 512
                    self.wfile.write(body[sent:])
                    return None
                hub.released.wait(60)
                self.close_connection = True
                return None  # the connection closes short: a truncated transfer
            self.wfile.write(body)
            return None

    return Handler


@contextmanager
def publisher(host: str, port: int) -> Iterator[mqtt.Client]:
    """An MQTT client acting as the hub's publisher."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-hub", protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        yield client
    finally:
        client.loop_stop()
        client.disconnect()


def publish_desired(
    client: mqtt.Client,
    device_id: str,
    revision: int,
    models: dict[str, DesiredModel],
    config: dict[str, Any] | None = None,
) -> None:
    """Publish a retained desired state, as the hub does."""
    state = DesiredState(device_id=device_id, revision=revision, models=models, config=config or {})
    info = client.publish(
        topics.device_topic(device_id, topics.DeviceChannel.DESIRED), encode(state), qos=1, retain=True
    )
    info.wait_for_publish(5)
