"""Prometheus metrics of one hub app: API latency, the fleet, rollouts, training jobs, MQTT ingest.

Names follow the Prometheus conventions (base units, `_total` on counters, `_seconds`) and
are what the dashboards and alert rules in k3s/components/monitoring query; a test checks
every query against a live /metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.db import SessionFactory
from hub.models import Device, Rollout, RolloutDevice, TrainingJob
from shared import tracing

__all__ = ["HubMetrics", "RequestTimer"]


class _FleetCollector(Collector):
    """Reads the fleet and the messaging counters at scrape time."""

    def __init__(
        self, sessions: SessionFactory, messaging: Callable[[], Any], captures: Callable[[], dict[str, int]]
    ) -> None:
        self._sessions = sessions
        self._messaging = messaging
        self._captures = captures

    def collect(self) -> Iterator[Metric]:
        with self._sessions() as session:
            active = col(Device.decommissioned).is_(False)
            total = session.exec(select(func.count()).select_from(Device).where(active)).one()
            online = session.exec(
                select(func.count()).select_from(Device).where(active, col(Device.online).is_(True))
            ).one()
            reported = session.exec(select(Device.reported).where(active)).all()
            rollouts = session.exec(select(Rollout.state, func.count()).group_by(Rollout.state)).all()
            running = session.exec(
                select(Rollout.id, Rollout.model, Rollout.version, Rollout.step).where(Rollout.state == "running")
            ).all()
            members = session.exec(
                select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
                .where(col(Rollout.state).in_(("running", "paused")))
                .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
            ).all()
            # Jobs are rows (hub.training.jobs), so every hub replica reports the same counts.
            jobs = session.exec(select(TrainingJob.status, func.count()).group_by(TrainingJob.status)).all()
            started = session.exec(
                select(func.min(TrainingJob.started_at)).where(col(TrainingJob.status) == "running")
            ).one()
        yield GaugeMetricFamily("autodl_hub_devices", "enrolled devices (not decommissioned)", value=total)
        yield GaugeMetricFamily("autodl_hub_devices_online", "devices connected to the broker", value=online)
        yield from _fleet_versions(reported)
        by_state = GaugeMetricFamily("autodl_hub_rollouts", "rollouts by state", labels=["state"])
        for state, count in sorted(rollouts):
            by_state.add_metric([state], count)
        yield by_state
        step = GaugeMetricFamily(
            "autodl_hub_rollout_step",
            "current step (from 0) of running rollouts",
            labels=["rollout", "model", "version"],
        )
        for rollout_id, model, version, at in running:
            step.add_metric([rollout_id, model, version], at)
        yield step
        moved = GaugeMetricFamily(
            "autodl_hub_rollout_devices", "devices of running or paused rollouts by state", labels=["rollout", "state"]
        )
        for rollout_id, state, count in sorted(members):
            moved.add_metric([rollout_id, state], count)
        yield moved
        yield from _training_jobs(dict(jobs), started)
        captured = CounterMetricFamily(
            "autodl_hub_captured_items", "captured items uploaded by outcome", labels=["outcome"]
        )
        for outcome, count in self._captures().items():
            captured.add_metric([outcome], float(count))
        yield captured
        messaging = self._messaging()
        if messaging is not None:
            # The MQTT session owns its counters (hub.messaging): ingest, rejects, queue depth.
            yield from messaging.collector().collect()
        if tracing.enabled():
            spans = CounterMetricFamily("autodl_hub_tracing_spans", "trace spans by export outcome", labels=["outcome"])
            for outcome, count in sorted(tracing.stats().items()):
                spans.add_metric([outcome], count)
            yield spans


def _fleet_versions(reported: Sequence[Mapping[str, Any] | None]) -> Iterator[Metric]:
    """Yield devices by active model version and by update state, from their reported states."""
    versions: Counter[tuple[str, str]] = Counter()
    states: Counter[tuple[str, str]] = Counter()
    for report in reported:
        for name, status in ((report or {}).get("models") or {}).items():
            if isinstance(status, dict):
                versions[(name, str(status.get("active") or "none"))] += 1
                states[(name, str(status.get("state") or "idle"))] += 1
    family = GaugeMetricFamily(
        "autodl_hub_model_devices", "devices by active model version", labels=["model", "version"]
    )
    for (name, version), count in sorted(versions.items()):
        family.add_metric([name, version], count)
    yield family
    family = GaugeMetricFamily("autodl_hub_model_update_devices", "devices by update state", labels=["model", "state"])
    for (name, update), count in sorted(states.items()):
        family.add_metric([name, update], count)
    yield family


def _training_jobs(counts: dict[str, int], oldest_start: datetime | None) -> Iterator[Metric]:
    """Yield the training jobs by status, and how long the oldest running one has run."""
    family = GaugeMetricFamily("autodl_hub_training_jobs", "training jobs by status", labels=["status"])
    oldest = 0.0
    if oldest_start is not None:
        start = oldest_start if oldest_start.tzinfo is not None else oldest_start.replace(tzinfo=UTC)
        oldest = max(0.0, time.time() - start.timestamp())
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        family.add_metric([status], counts.get(status, 0))
    yield family
    yield GaugeMetricFamily(
        "autodl_hub_training_job_running_seconds", "age of the oldest running training job", value=oldest
    )


class HubMetrics:
    """The app's own registry (so several apps in one process do not collide)."""

    def __init__(
        self,
        sessions: SessionFactory,
        messaging: Callable[[], Any],
        captures: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "autodl_hub_api_request_duration_seconds",
            "API request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_FleetCollector(sessions, messaging, captures))

    def render(self) -> bytes:
        """Return the exposition text."""
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware: time every request into `HubMetrics.latency`, by route template (not raw path).

    A plain ASGI wrapper: Starlette's ``@app.middleware("http")`` runs each request in a task
    group with memory streams, which cost more than the handler of a small request. The time
    is taken when the response starts, as ``call_next`` gave it.
    """

    def __init__(self, app: ASGIApp, metrics: HubMetrics) -> None:
        self.app = app
        self.latency = metrics.latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            template = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], template, str(status)).observe(time.perf_counter() - started)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not observed:
                observe(500)
