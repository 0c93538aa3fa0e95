"""The `autodl-agent run` process: wires the store, updater, MQTT session and local API."""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from types import FrameType
from typing import Any

import httpx

from agent import __version__
from agent.artifacts import ArtifactCache
from agent.config import AgentSettings, Identity, load_identity
from agent.device import detect_profile, physical_cores
from agent.errors import CredentialsError
from agent.runtime import ModelRegistry
from agent.server import InferenceServer, ServerContext
from agent.store import Store
from agent.sync import MqttSession
from agent.updates import IN_PROGRESS, Updater
from shared.messages import ModelStatus, ReportedState, UpdateState
from shared.targets import DeviceProfile, choose_targets
from shared.topics import DeviceChannel

__all__ = ["Agent", "reported_state"]

logger = logging.getLogger(__name__)


def reported_state(
    identity: Identity, store: Store, revision: int, profile: DeviceProfile | None, errors: list[str]
) -> ReportedState:
    """Build the reported state from the journal."""
    models: dict[str, ModelStatus] = {}
    states = []
    for record in store.models():
        states.append(record.state)
        models[record.name] = ModelStatus(
            active=record.active.version if record.active else None,
            previous=record.previous.version if record.previous else None,
            target=record.active.target if record.active and record.active.target else None,
            desired=record.desired_version,
            state=record.state,
            error=record.error[:4096] if record.error else None,
        )
    overall: UpdateState | None = next(
        (s for s in (UpdateState.DOWNLOADING, UpdateState.VERIFYING, UpdateState.STAGING) if s in states), None
    )
    if overall is None:
        overall = (
            UpdateState.ROLLED_BACK
            if UpdateState.ROLLED_BACK in states
            else (UpdateState.ACTIVE if UpdateState.ACTIVE in states else UpdateState.IDLE)
        )
    return ReportedState(
        device_id=identity.device_id,
        revision=revision,
        models=models,
        update_state=overall,
        errors=[e[:4096] for e in errors[-32:]],
        profile=profile,
        agent_version=__version__,
    )


class Agent:
    """One running agent; `run()` blocks until SIGTERM/SIGINT or a fatal error."""

    def __init__(self, settings: AgentSettings, identity: Identity | None = None) -> None:
        self.settings = settings
        self.identity = identity or load_identity(settings)
        self.profile = detect_profile(settings.state_dir)
        self.store = Store(settings.db_path)
        self.cache = ArtifactCache(settings.cache_dir, settings.download_chunk_bytes, settings.disk_reserve_mb)
        self.registry = ModelRegistry()
        self.errors: deque[str] = deque(maxlen=32)
        self.client = httpx.Client(
            headers={
                "Authorization": f"Bearer {self.identity.device_token}",
                "User-Agent": f"autodl-agent/{__version__}",
            },
            timeout=httpx.Timeout(settings.http_timeout_s),
            follow_redirects=True,
        )
        self.updater = Updater(
            settings,
            self.identity,
            self.store,
            self.cache,
            self.registry,
            self.client,
            choose_targets(self.profile),
            settings.intra_op_threads or physical_cores(),
            on_change=self.publish_reported,
        )
        self.session = MqttSession(
            self.identity,
            settings,
            on_desired=self.updater.apply,
            on_connected=self.publish_reported,
            on_invalid=self._invalid,
        )
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()
        self.server = InferenceServer(
            settings.host, settings.port, ServerContext(self.registry, self._ready.is_set, self.status)
        )

    def _invalid(self, message: str) -> None:
        self.errors.append(message)
        self.publish_reported()

    def publish_reported(self) -> None:
        """Publish the reported state (retained); on reconnect it is published again."""
        state = reported_state(
            self.identity, self.store, self.updater.applied_revision(), self.profile, list(self.errors)
        )
        with self._publish_lock:
            self.store.put("reported", state.model_dump_json())
            self.session.publish(DeviceChannel.REPORTED, state, retain=True)

    def status(self) -> dict[str, Any]:
        """Return what `autodl-agent status` shows."""
        return {
            "device_id": self.identity.device_id,
            "hub_url": self.identity.hub_url,
            "mqtt": f"{self.identity.mqtt_host}:{self.identity.mqtt_port}",
            "connected": self.session.connected.is_set(),
            "ready": self._ready.is_set(),
            "applied_revision": self.updater.applied_revision(),
            "models": [
                {
                    "name": r.name,
                    "state": r.state.value,
                    "active": r.active.version if r.active else None,
                    "previous": r.previous.version if r.previous else None,
                    "pending": r.pending.version if r.pending else None,
                    "error": r.error,
                }
                for r in self.store.models()
            ],
            "updating": any(r.state in IN_PROGRESS for r in self.store.models()),
            "outbox": 0,
            "errors": list(self.errors),
            "agent_version": __version__,
        }

    def start(self) -> None:
        """Restore verified models, start the API and the MQTT session."""
        self.server.start()
        self.store.put("api_port", str(self.server.port))
        self.updater.recover()
        self._ready.set()
        self.session.start()

    def stop(self) -> None:
        """Stop everything; an update in progress stays journaled."""
        self._stop.set()
        self.session.stop()
        self.updater.stop()
        self.server.stop()
        self.client.close()
        self.store.close()

    def run(self) -> None:
        """Run until a signal or a fatal session error; raise CredentialsError on the latter."""

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        fatal: CredentialsError | None = None
        while not self._stop.wait(0.5):
            if self.session.fatal is not None:
                fatal = self.session.fatal
                break
        self.stop()
        if fatal is not None:
            raise fatal
