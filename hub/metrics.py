"""Prometheus metrics of one hub app: API latency, devices online, MQTT messages by outcome."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response

from hub.db import SessionFactory
from hub.models import Device

__all__ = ["HubMetrics"]


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
        yield GaugeMetricFamily("autodl_hub_devices", "enrolled devices (not decommissioned)", value=total)
        yield GaugeMetricFamily("autodl_hub_devices_online", "devices connected to the broker", value=online)
        ingested = CounterMetricFamily("autodl_hub_mqtt_messages_ingested", "MQTT messages stored", labels=["kind"])
        rejected = CounterMetricFamily("autodl_hub_mqtt_messages_rejected", "MQTT messages dropped", labels=["reason"])
        for kind, count in _counts(self._messaging(), "ingested").items():
            ingested.add_metric([kind], count)
        for reason, count in _counts(self._messaging(), "rejected").items():
            rejected.add_metric([reason], count)
        yield ingested
        yield rejected
        snapshot = _snapshot(self._messaging())
        points = CounterMetricFamily("autodl_hub_telemetry_points", "telemetry points by outcome", labels=["outcome"])
        points.add_metric(["written"], float(getattr(snapshot, "points_written", 0) or 0))
        points.add_metric(["duplicate"], float(getattr(snapshot, "points_duplicate", 0) or 0))
        yield points
        captured = CounterMetricFamily(
            "autodl_hub_captured_items", "captured items uploaded by outcome", labels=["outcome"]
        )
        for outcome, count in self._captures().items():
            captured.add_metric([outcome], float(count))
        yield captured


def _snapshot(messaging: Any) -> Any:
    snapshot = getattr(getattr(messaging, "counters", None), "snapshot", None)
    return snapshot() if callable(snapshot) else None


def _counts(messaging: Any, which: str) -> dict[str, float]:
    """Return {label: count} from `messaging.counters` (a mapping, or an object with a snapshot)."""
    if messaging is None:
        return {}
    counters = getattr(messaging, "counters", None)
    if counters is None:
        return {}
    if callable(getattr(counters, "snapshot", None)):
        counters = counters.snapshot()
    value = counters.get(which) if isinstance(counters, Mapping) else getattr(counters, which, None)
    if isinstance(value, int | float):
        return {"all": float(value)}
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {}


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
            "autodl_hub_api_request_seconds",
            "API request latency",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_FleetCollector(sessions, messaging, captures))

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
