"""The `autodl-agent run` process: wires the store, updater, MQTT session and local API."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from types import FrameType
from typing import Any

import httpx

from agent import __version__
from agent.actions import SETTABLE, apply_config, build_actions
from agent.artifacts import ArtifactCache
from agent.capture import Capture, http_uploader
from agent.commands import CommandHandler
from agent.config import AgentSettings, Identity, load_identity
from agent.device import detect_profile, physical_cores
from agent.errors import AgentError, CredentialsError
from agent.healing import HealthMonitor, Watchdog, reload, rollback
from agent.http import Limits, raise_open_files_limit
from agent.openai_api import GenerationHooks, sequence_metrics
from agent.runtime import LoadedModel, ModelRegistry
from agent.server import InferenceServer, ServerContext
from agent.store import Store
from agent.sync import MqttSession
from agent.telemetry import Family, Telemetry
from agent.textgen import Finished
from agent.tls import ssl_context
from agent.updates import IN_PROGRESS, Updater
from shared import tracing
from shared.codec import encode
from shared.manifest import Batching
from shared.messages import (
    CommandResult,
    DesiredState,
    ModelStatus,
    OutboxReport,
    ReportedState,
    UpdateState,
    utcnow,
)
from shared.private_files import make_private
from shared.targets import DeviceProfile, choose_targets
from shared.topics import DeviceChannel

__all__ = ["Agent", "limits", "reported_state", "stored_config"]

logger = logging.getLogger(__name__)


def stored_config(settings: AgentSettings, applied: dict[str, Any]) -> dict[str, Any]:
    """Return the applied settings as JSON values that `apply_config` accepts again after a restart."""
    return settings.model_dump(mode="json", include=set(applied))


def limits(settings: AgentSettings) -> Limits:
    """Return the local API's bounds from the settings."""
    mb = 1024 * 1024
    return Limits(
        workers=settings.http_workers,
        queue=settings.http_queue,
        max_body=int(settings.max_body_mb * mb),
        body_budget=int(settings.body_budget_mb * mb),
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        keepalive_s=settings.http_keepalive_s,
        busy_poll_s=settings.http_busy_poll_us / 1e6,
    )


def reported_state(
    identity: Identity,
    store: Store,
    revision: int,
    profile: DeviceProfile | None,
    errors: list[str],
    grpc_port: int | None = None,
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
            else (
                UpdateState.ACTIVE
                if UpdateState.ACTIVE in states
                else (UpdateState.COMMITTED if UpdateState.COMMITTED in states else UpdateState.IDLE)
            )
        )
    return ReportedState(
        device_id=identity.device_id,
        revision=revision,
        models=models,
        update_state=overall,
        errors=[e[:4096] for e in errors[-32:]],
        profile=profile,
        agent_version=__version__,
        grpc_port=grpc_port,
        outbox=_outbox_report(store),
    )


def _outbox_report(store: Store) -> OutboxReport:
    stats = store.outbox_stats()
    return OutboxReport(
        pending=stats.telemetry_pending + stats.messages_pending, dropped=stats.dropped, refused=stats.refused
    )


class Agent:
    """One running agent; `run()` blocks until SIGTERM/SIGINT or a fatal error."""

    def __init__(self, settings: AgentSettings, identity: Identity | None = None) -> None:
        self.settings = settings
        make_private(settings.state_dir)
        self.identity = identity or load_identity(settings)
        self.profile = detect_profile(settings.state_dir)
        self.store = Store(settings.db_path)
        self._load_config()
        self.store.outbox_max_bytes = int(settings.outbox_max_mb * 1024 * 1024)
        self.telemetry = Telemetry(settings.state_dir)
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
            verify=ssl_context(settings),
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
            on_activated=self._activated,
        )
        self.watchdog = Watchdog(settings, self.telemetry, lambda name: reload(self.updater, name))
        self.health = HealthMonitor(
            settings, self.telemetry, lambda name, why: rollback(self.updater, name, why), self._commit
        )
        self.commands = CommandHandler(
            self.identity.device_id, self.store, build_actions(self), self._emit_result, settings.command_rate
        )
        self.session = MqttSession(
            self.identity,
            settings,
            on_desired=self._on_desired,
            on_connected=self.publish_reported,
            on_invalid=self._invalid,
            on_command=self.commands.handle,
            store=self.store,
        )
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()
        self._restart = False
        self._tick = time.monotonic()
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)
        self.capture = Capture(
            settings.state_dir / "capture",
            lambda: self.settings.capture,
            http_uploader(self.client, self.identity.hub_url, self.identity.device_id),
            self.identity.device_id,
            interval_s=settings.capture_interval_s,
            retry_max_s=settings.retry_max_s,
            day_counts=(lambda: self.store.get("capture_day"), lambda value: self.store.put("capture_day", value)),
        )
        context = ServerContext(
            self.registry,
            self._ready.is_set,
            self.status,
            track=self.watchdog.request,
            metrics=self.metrics_text,
            live=self.live,
            refused=self.telemetry.refused,
            batching=self.batching,
            batch_stats=self.telemetry.observe_batch,
            # A run with N intra-op threads keeps N cores busy: this many runs fill the device.
            batch_instances=max(1, (os.cpu_count() or 1) // (settings.intra_op_threads or physical_cores())),
            limits=limits(settings),
            generation=GenerationHooks(self._observe_generation, self.telemetry.bad_request),
            api_token=settings.api_token,
            bind_host=settings.host,
            capture=self.capture.offer,
        )
        raise_open_files_limit()  # each idle keep-alive connection is a file descriptor
        self.server = InferenceServer(settings.host, settings.port, context)
        self.grpc: Any = None  # agent.grpc_server.GrpcServer when the grpc extra is installed and a port set

    def _on_desired(self, desired: DesiredState) -> None:
        """Apply the desired settings (the settable ones; others are reported), then the models."""
        newer = self.updater.superseded(desired)
        if newer is not None:
            self.session.count_rejected("stale_revision")
            logger.info("desired revision %d ignored: revision %d arrived before it", desired.revision, newer)
            return
        if desired.config and desired.device_id == self.identity.device_id:
            known = {k: v for k, v in desired.config.items() if k in SETTABLE}
            unknown = sorted(set(desired.config) - SETTABLE)
            message = f"desired config keys not settable on this agent: {unknown}"
            if unknown and message not in self.errors:  # the retained state comes again on reconnect
                self.errors.append(message)
            try:
                if known:
                    self.save_config(apply_config(self.settings, known))
            except AgentError as exc:
                self.errors.append(f"desired config refused: {exc}")
        self.updater.apply(desired)

    def batching(self, model: LoadedModel) -> Batching | None:
        """Return a model's dynamic batching: the desired config's over the manifest's."""
        return self.settings.batching.get(model.name, model.variant.batching)

    def _invalid(self, message: str) -> None:
        self.errors.append(message)
        self.publish_reported()

    def publish_reported(self) -> None:
        """Publish the reported state (retained); on reconnect it is published again."""
        state = reported_state(
            self.identity,
            self.store,
            self.updater.applied_revision(),
            self.profile,
            list(self.errors),
            self.grpc.port if self.grpc is not None else None,
        )
        with self._publish_lock, tracing.span("agent.report", {"revision": state.revision}):
            self.store.put("reported", state.model_dump_json())
            # Through the outbox; a newer state replaces an unsent older one (the hub keeps the latest).
            self.store.enqueue_message(DeviceChannel.REPORTED.value, encode(state).decode(), retain=True, replace=True)
        self.session.wake()

    def _emit_result(self, result: CommandResult) -> None:
        self.store.enqueue_message(DeviceChannel.RESULTS.value, encode(result).decode())
        self.session.wake()

    # self-healing, telemetry, config -------------------------------------------------------------
    def _activated(self, name: str, version: str, previous: str | None) -> None:
        self.health.activated(name, version, previous)

    def _observe_generation(self, name: str, version: str, seconds: float, ok: bool, done: Finished | None) -> None:
        self.telemetry.observe_generation(
            name,
            version,
            seconds,
            ok,
            done.ttft_s if done else None,
            done.decode_tps if done else None,
            done.prompt_tokens if done else 0,
            done.completion_tokens if done else 0,
        )

    def _commit(self, name: str, version: str) -> None:
        record = self.store.model(name)
        if record.active is not None and record.active.version == version and record.state == UpdateState.ACTIVE:
            self.updater.save(record.with_(state=UpdateState.COMMITTED), f"committed {version} after a clean window")

    def _load_config(self) -> None:
        raw = self.store.get("config")
        if raw:
            try:
                apply_config(self.settings, json.loads(raw))
            except (AgentError, ValueError) as exc:
                logger.warning("stored configuration ignored: %s", exc)

    def save_config(self, applied: dict[str, Any]) -> None:
        """Keep `set-config` changes across restarts."""
        current = json.loads(self.store.get("config") or "{}")
        # As JSON the settings schema reads back (a nested model such as `batching` included).
        self.store.put("config", json.dumps({**current, **stored_config(self.settings, applied)}))
        self.store.outbox_max_bytes = int(self.settings.outbox_max_mb * 1024 * 1024)
        self.commands.limit.per_minute = self.settings.command_rate

    def request_restart(self) -> None:
        """Restart the process once the pending results are acknowledged (the `restart` command)."""

        def later() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.store.outbox_stats().messages_pending:
                time.sleep(0.05)
            self._restart = True
            self._stop.set()

        # The restart result is queued after this returns: give it a moment to be enqueued.
        threading.Timer(0.2, later).start()

    def _maintain(self) -> None:
        collected = time.monotonic()
        while not self._stop.wait(min(0.25, self.settings.telemetry_interval_s)):
            self._tick = time.monotonic()
            try:
                self.watchdog.check()
                self.health.check()
                # Against the interval as set now: a changed interval applies from this round on.
                if time.monotonic() >= collected + self.settings.telemetry_interval_s:
                    collected = time.monotonic()
                    self._collect()
            except Exception:  # one failed round must not stop telemetry for good
                logger.exception("maintenance round failed")

    def _collect(self) -> None:
        stats = self.store.outbox_stats()
        points = self.telemetry.collect()
        points.append(("outbox_pending", float(stats.telemetry_pending + stats.messages_pending), {}))
        points.append(("outbox_dropped_total", float(stats.dropped), {}))
        points.append(("outbox_refused_total", float(stats.refused), {}))
        ts = utcnow().isoformat()
        self.store.enqueue_telemetry([(ts, name, value, labels) for name, value, labels in points])
        self.session.wake()

    def live(self) -> bool:
        """Return False when the maintenance loop has stopped ticking (a hung agent: restart it)."""
        return time.monotonic() - self._tick < max(30.0, 4 * self.settings.telemetry_interval_s)

    def metrics_text(self) -> str:
        """Return /metrics."""
        stats = self.store.outbox_stats()
        families: list[Family] = [
            (
                "outbox_telemetry_pending",
                "gauge",
                "Telemetry points waiting in the outbox",
                [({}, stats.telemetry_pending)],
            ),
            (
                "outbox_messages_pending",
                "gauge",
                "State and results waiting in the outbox",
                [({}, stats.messages_pending)],
            ),
            ("outbox_bytes", "gauge", "Size of what waits in the outbox", [({}, stats.bytes)]),
            ("outbox_dropped_total", "counter", "Telemetry points dropped by the full outbox", [({}, stats.dropped)]),
            ("outbox_refused_total", "counter", "Deliveries the broker refused (kept, retried)", [({}, stats.refused)]),
            (
                "outbox_throttled_total",
                "counter",
                "Send rounds that held telemetry back for the hub's quota",
                [({}, self.session.throttled)],
            ),
            (
                "mqtt_connected",
                "gauge",
                "1 while the MQTT session is up",
                [({}, float(self.session.connected.is_set()))],
            ),
            ("watchdog_reloads_total", "counter", "Models reloaded by the watchdog", [({}, self.watchdog.reloads)]),
            (
                "manifests_refused_total",
                "counter",
                "Signed manifests refused, by reason (unknown_key: no chain to a trusted key; retired_key; ...)",
                [({"reason": reason}, n) for reason, n in sorted(self.updater.keys.refused.items())],
            ),
            (
                "mqtt_messages_rejected_total",
                "counter",
                "MQTT messages from the hub not acted on, by reason (stale_revision: an older desired state)",
                [({"reason": reason}, n) for reason, n in sorted(self.session.rejected.items())],
            ),
            (
                "commands_total",
                "counter",
                "Commands received, by outcome",
                [({"outcome": outcome}, n) for outcome, n in sorted(self.commands.counters.items())],
            ),
        ]
        counters = vars(self.capture.counters)
        families.append(
            (
                "capture_items_total",
                "counter",
                "Hard-example capture: requests offered, judged, kept, dropped, uploaded, by outcome",
                [({"outcome": name}, float(n)) for name, n in sorted(counters.items())],
            )
        )
        families.append(
            (
                "capture_spool_items",
                "gauge",
                "Captured items waiting for upload",
                [({}, float(len(self.capture.spool)))],
            )
        )
        if tracing.enabled():
            spans = [({"outcome": outcome}, float(n)) for outcome, n in sorted(tracing.stats().items())]
            families.append(("tracing_spans_total", "counter", "Trace spans by export outcome", spans))
        return self.telemetry.prometheus(families) + sequence_metrics(self.registry)

    def diagnostics(self) -> dict[str, Any]:
        """Return what the `diagnostics` command answers."""
        stats = self.store.outbox_stats()
        return {
            "profile": self.profile.model_dump(mode="json"),
            "agent_version": __version__,
            "models": self.status()["models"],
            "recent_errors": list(self.errors),
            "journal": [entry.__dict__ for entry in self.store.journal(limit=20)],
            "outbox": stats.__dict__,
            "commands": dict(self.commands.counters),
            "rejected_messages": dict(self.session.rejected),
            "health_windows": self.health.open_windows(),
            "watchdog_reloads": self.watchdog.reloads,
            "settings": {key: getattr(self.settings, key) for key in sorted(SETTABLE)},
        }

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
            "outbox": self.store.outbox_stats().__dict__,
            "errors": list(self.errors),
            "signing_keys": self.updater.keys.status(),
            "agent_version": __version__,
            "api_port": self.server.port,
            "grpc_port": self.grpc.port if self.grpc is not None else None,
        }

    def start(self) -> None:
        """Restore verified models, start the API and the MQTT session."""
        tracing.configure("autodl-agent", {"service.instance.id": self.identity.device_id})
        self.server.start()
        self.store.put("api_port", str(self.server.port))
        self._start_grpc()
        self.updater.recover()
        for record in self.store.models():
            # A window the last process did not finish starts again (no baseline survives a
            # restart, so only the error rate is judged).
            if record.state == UpdateState.ACTIVE and record.active is not None and record.previous is not None:
                self.health.activated(record.name, record.active.version, record.previous.version)
        # What start made (modules, sessions, manifests: ~60,000 objects) leaves the cyclic
        # collector's reach: a full collection walked it all, a pause of 20-180 ms on whichever
        # request triggered it. Garbage is still freed by reference counts.
        gc.freeze()
        self._ready.set()
        self.commands.start()
        self._maintenance.start()
        self.capture.start()
        self.session.start()

    def _start_grpc(self) -> None:
        if self.settings.grpc_port is None:
            return
        try:
            from agent.grpc_server import GrpcServer
        except ImportError as exc:
            message = f"grpc_port is set but the grpc extra is not installed (pip install 'autodl[agent,grpc]'): {exc}"
            logger.error("%s", message)
            self.errors.append(message)
            return
        try:
            self.grpc = GrpcServer(self.settings.host, self.settings.grpc_port, self.server)
            self.grpc.start()
        except (OSError, RuntimeError) as exc:
            self.grpc = None
            message = f"gRPC API not started on port {self.settings.grpc_port}: {exc}"
            logger.error("%s", message)
            self.errors.append(message)
            return
        self.store.put("grpc_port", str(self.grpc.port))

    def stop(self) -> None:
        """Stop everything; an update in progress stays journaled."""
        self._stop.set()
        self.session.stop()
        self.commands.stop()
        self.updater.stop()
        self.server.stop()
        if self.grpc is not None:
            self.grpc.stop()
        self.capture.stop()
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
        if self._restart:
            logger.info("restarting (restart command)")
            os.execv(sys.executable, sys.orig_argv)
