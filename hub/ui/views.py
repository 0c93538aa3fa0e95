"""What the dashboard pages show, computed from the domain modules' queries (no SQL of its own)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from hub import registry
from hub.fleet.telemetry import query_points
from hub.models import Device, Model, ModelVersion, TelemetryPoint, utcnow
from shared.manifest import Manifest

__all__ = [
    "Chart",
    "DeviceModelRow",
    "FleetSummary",
    "VersionView",
    "all_models",
    "charts_for",
    "device_models",
    "fleet_summary",
    "model_versions",
    "telemetry_charts",
]

# Chart groups in page order: a telemetry name goes to the first group whose test matches,
# so whatever exact names the agent publishes (latency_p50_ms, cpu_percent...) find a chart.
# One unit per chart (the chart script scales bytes to KB/MB/GB and ms to s on its axis):
# a percentage never shares an axis with bytes, nor a rate with a count.
_GROUPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("latency", "Latency", "ms", ("latency",)),
    ("throughput", "Throughput", "req/s", ("throughput", "rps")),
    ("requests", "Requests and errors per interval", "count", ("requests", "error")),
    ("cpu", "CPU", "%", ("cpu",)),
    ("memory", "Memory", "bytes", ("memory_used_bytes", "rss")),
    ("memory_percent", "Memory in use", "%", ("mem",)),
)
# The unit of any other telemetry name, by its suffix.
_SUFFIX_UNITS = (("_bytes", "bytes"), ("_percent", "%"), ("_ms", "ms"), ("_seconds", "s"), ("_c", "°C"))
_MAX_POINTS = 50_000


def _models(state: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    models = (state or {}).get("models")
    if not isinstance(models, Mapping):
        return {}
    return {k: dict(v) for k, v in models.items() if isinstance(v, Mapping)}


@dataclass(frozen=True)
class FleetSummary:
    """Counts for the overview: presence, per label, per running version, per update state."""

    total: int
    online: int
    by_label: list[tuple[str, int, int]]  # "key=value", online, offline
    by_version: list[tuple[str, str, int, int]]  # model, version, running, desired
    update_states: list[tuple[str, int]]
    in_sync: int


def fleet_summary(devices: Sequence[Device]) -> FleetSummary:
    """Summarise devices by presence, label, model version and update state."""
    labels: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    running: Counter[tuple[str, str]] = Counter()
    desired: Counter[tuple[str, str]] = Counter()
    states: Counter[str] = Counter()
    in_sync = 0
    for device in devices:
        for key, value in device.labels.items():
            labels[f"{key}={value}"][0 if device.online else 1] += 1
        reported = _models(device.reported)
        wanted = _models(device.desired)
        for name, status in reported.items():
            if status.get("active"):
                running[(name, str(status["active"]))] += 1
        for name, entry in wanted.items():
            desired[(name, str(entry.get("version")))] += 1
        states[str((device.reported or {}).get("update_state") or "unknown")] += 1
        if all((reported.get(n) or {}).get("active") == e.get("version") for n, e in wanted.items()):
            in_sync += 1
    versions = sorted(
        ((m, v, running[(m, v)], desired[(m, v)]) for (m, v) in running.keys() | desired.keys()),
        key=lambda row: (row[0], registry.semver_key(row[1])),
    )
    return FleetSummary(
        total=len(devices),
        online=sum(1 for d in devices if d.online),
        by_label=sorted((k, on, off) for k, (on, off) in labels.items()),
        by_version=versions,
        update_states=sorted(states.items()),
        in_sync=in_sync,
    )


@dataclass(frozen=True)
class DeviceModelRow:
    """One model on a device: what the hub wants next to what the device runs."""

    name: str
    desired: str | None
    active: str | None
    previous: str | None
    target: str | None
    state: str | None
    error: str | None
    updated_at: str | None

    @property
    def in_sync(self) -> bool:
        """Return True when the device runs the desired version."""
        return self.desired is not None and self.desired == self.active


def device_models(device: Device) -> list[DeviceModelRow]:
    """Return desired vs reported state per model name."""
    wanted, reported = _models(device.desired), _models(device.reported)
    rows = []
    for name in sorted(wanted.keys() | reported.keys()):
        status = reported.get(name, {})
        rows.append(
            DeviceModelRow(
                name=name,
                desired=wanted.get(name, {}).get("version"),
                active=status.get("active"),
                previous=status.get("previous"),
                target=status.get("target"),
                state=status.get("state"),
                error=status.get("error"),
                updated_at=status.get("updated_at"),
            )
        )
    return rows


@dataclass(frozen=True)
class Chart:
    """One chart: a title and named series of (epoch milliseconds, value) points."""

    key: str
    title: str
    unit: str = "count"
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Return the form the dashboard's chart script draws."""
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "series": [{"name": n, "points": p} for n, p in sorted(self.series.items())],
        }


def _group(name: str) -> tuple[str, str, str]:
    lowered = name.lower()
    for key, title, unit, needles in _GROUPS:
        if any(n in lowered for n in needles):
            return key, title, unit
    unit = next((u for suffix, u in _SUFFIX_UNITS if lowered.endswith(suffix)), "count")
    return f"other:{name}", name, unit


def charts_for(points: Sequence[TelemetryPoint]) -> list[Chart]:
    """Group telemetry points into the dashboard's charts (latency, throughput, CPU, memory, others)."""
    charts: dict[str, Chart] = {}
    for point in points:
        key, title, unit = _group(point.name)
        chart = charts.setdefault(key, Chart(key, title, unit))
        model = point.labels.get("model")
        series = f"{point.name} ({model})" if model else point.name
        chart.series.setdefault(series, []).append((int(point.ts.timestamp() * 1000), point.value))
    order = {key: i for i, (key, _t, _u, _n) in enumerate(_GROUPS)}
    return sorted(charts.values(), key=lambda c: (order.get(c.key, len(order)), c.key))


def telemetry_charts(session: Session, device_id: str, minutes: int) -> list[Chart]:
    """Return the charts of a device's telemetry over the last `minutes`."""
    start = utcnow() - timedelta(minutes=minutes)
    return charts_for(query_points(session, device_id=device_id, start=start, limit=_MAX_POINTS))


@dataclass(frozen=True)
class VersionView:
    """One version of a model with its manifest (variants, skipped targets, gate figures)."""

    version: str
    status: str
    created_at: datetime
    published_by: str
    manifest: Manifest | None
    aliases: list[str]
    problem: str | None = None


def model_versions(session: Session, model: Model) -> list[VersionView]:
    """Return a model's versions, newest first, with the aliases (``latest`` too) that point at each."""
    by_version: dict[str, list[str]] = defaultdict(list)
    for alias, version in registry.aliases(session, model).items():
        by_version[version].append(alias)
    views = []
    for row in registry.list_versions(session, model):
        manifest, problem = _manifest(row)
        views.append(
            VersionView(
                version=row.version,
                status=row.status,
                created_at=row.created_at,
                published_by=row.published_by,
                manifest=manifest,
                aliases=sorted(by_version.get(row.version, [])),
                problem=problem,
            )
        )
    return views


def _manifest(row: ModelVersion) -> tuple[Manifest | None, str | None]:
    try:
        return Manifest.model_validate(row.manifest), None
    except ValueError as exc:  # a row written by an older contract: show the version, say why not its details
        return None, f"manifest not readable: {exc.__class__.__name__}"


def all_models(session: Session) -> list[tuple[Model, list[str], dict[str, str]]]:
    """Return every model with its version names and aliases."""
    out = []
    for model in session.exec(select(Model).order_by(col(Model.name))):
        versions = [v.version for v in registry.list_versions(session, model)]
        out.append((model, versions, registry.aliases(session, model)))
    return out
