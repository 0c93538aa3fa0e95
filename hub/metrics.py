"""Prometheus metrics of one hub app: API latency, the fleet, rollouts, training jobs, MQTT ingest.

Names follow the Prometheus conventions (base units, `_total` on counters, `_seconds`) and
are what the dashboards and alert rules in k3s/components/monitoring query; a test checks
every query against a live /metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response

from hub.db import SessionFactory
from hub.models import Device, Rollout, RolloutDevice
from shared import tracing

__all__ = ["HubMetrics"]


class _FleetCollector(Collector):
    """Reads the fleet and the messaging counters at scrape time."""

    def __init__(
        self, sessions: SessionFactory, messaging: Callable[[], Any], jobs: Callable[[], Any] = lambda: None
    ) -> None:
        self._sessions = sessions
        self._messaging = messaging
        self._jobs = jobs

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
        yield from _training_jobs(self._jobs())
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


def _training_jobs(jobs: Any) -> Iterator[Metric]:
    """Yield the training jobs this hub process knows, by status."""
    family = GaugeMetricFamily("autodl_hub_training_jobs", "training jobs by status", labels=["status"])
    counts: Counter[str] = Counter()
    oldest = 0.0
    now = time.time()
    for job in jobs.list() if jobs is not None else []:
        counts[job.status] += 1
        if job.status == "running" and job.started_at is not None:
            oldest = max(oldest, now - job.started_at.timestamp())
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        family.add_metric([status], counts[status])
    yield family
    yield GaugeMetricFamily(
        "autodl_hub_training_job_running_seconds", "age of the oldest running training job", value=oldest
    )


class HubMetrics:
    """The app's own registry (so several apps in one process do not collide)."""

    def __init__(
        self, sessions: SessionFactory, messaging: Callable[[], Any], jobs: Callable[[], Any] = lambda: None
    ) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "autodl_hub_api_request_duration_seconds",
            "API request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_FleetCollector(sessions, messaging, jobs))

    def render(self) -> bytes:
        """Return the exposition text."""
        return generate_latest(self.registry)

    async def middleware(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Time every request, labelled by its route template (not the raw path)."""
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.latency.labels(request.method, template, str(status)).observe(time.perf_counter() - started)
