"""Decide whether a rollout step is healthy: pass, wait, or fail with a reason.

Evidence comes in two parts. Update outcomes: what each device of the step reports for
the model (running the new version, rolled back, still updating). Telemetry: requests,
errors and p95 latency of the devices on the new version versus those still on the
previous one, over the same window, so a fleet-wide load change does not fail a canary;
for a text-generation model also time to first token and decode tokens/s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hub.rollouts.spec import AnalysisCriteria
from shared.messages import UpdateState

__all__ = [
    "CohortMetrics",
    "DeviceObservation",
    "Outcome",
    "StepEvidence",
    "Verdict",
    "VerdictKind",
    "aggregate_metrics",
    "analyse",
    "classify",
    "observe",
]


class Outcome(StrEnum):
    """Where one device stands on the version it was told to run."""

    UPDATED = "updated"
    FAILED = "failed"
    PENDING = "pending"


class VerdictKind(StrEnum):
    """The analysis' answer."""

    PASS = "pass"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class DeviceObservation:
    """What one device reports for the rollout's model."""

    device_id: str
    online: bool
    active: str | None = None
    desired: str | None = None
    state: UpdateState | None = None
    error: str | None = None


@dataclass(frozen=True)
class CohortMetrics:
    """Telemetry of a group of devices over the analysis window."""

    devices: int = 0
    requests: float = 0.0
    errors: float = 0.0
    latency_p95_ms: float | None = None
    ttft_p95_ms: float | None = None
    decode_tps: float | None = None

    @property
    def error_rate(self) -> float | None:
        """Return errors per request, None without requests."""
        return self.errors / self.requests if self.requests > 0 else None


@dataclass(frozen=True)
class StepEvidence:
    """Everything the analysis of one step looks at."""

    version: str
    devices: tuple[DeviceObservation, ...]
    elapsed_s: float
    hold_s: float = 0.0
    canary: CohortMetrics = CohortMetrics()
    baseline: CohortMetrics = CohortMetrics()


@dataclass(frozen=True)
class Verdict:
    """The decision and why, with the counts an operator wants to see."""

    kind: VerdictKind
    reason: str
    updated: int = 0
    failed: int = 0
    pending: int = 0


def observe(device_id: str, online: bool, reported: Mapping[str, Any] | None, model: str) -> DeviceObservation:
    """Read a device's stored ReportedState (JSON) for one model; tolerate junk as 'no report'."""
    status = ((reported or {}).get("models") or {}).get(model)
    if not isinstance(status, Mapping):
        return DeviceObservation(device_id, online)
    try:
        state: UpdateState | None = UpdateState(status.get("state", UpdateState.IDLE.value))
    except ValueError:
        state = None
    return DeviceObservation(
        device_id,
        online,
        active=status.get("active"),
        desired=status.get("desired"),
        state=state,
        error=status.get("error"),
    )


def classify(obs: DeviceObservation, version: str) -> Outcome:
    """Return whether the device runs `version`, failed to, or is still on its way."""
    if obs.active == version and obs.state in (UpdateState.ACTIVE, UpdateState.COMMITTED, UpdateState.IDLE):
        return Outcome.UPDATED
    # Only a rollback *of this version* counts; an old rollback of something else does not.
    if obs.state is UpdateState.ROLLED_BACK and obs.desired == version and obs.active != version:
        return Outcome.FAILED
    return Outcome.PENDING


def aggregate_metrics(
    points: Iterable[tuple[str, str, float]], criteria: AnalysisCriteria, devices: int
) -> CohortMetrics:
    """Sum requests and errors; average p95 latency, time to first token and decode tokens/s over (device, name, value) points."""
    requests = errors = 0.0
    series: dict[str, list[float]] = {
        criteria.latency_metric: [],
        criteria.ttft_metric: [],
        criteria.decode_tps_metric: [],
    }
    for _device, name, value in points:
        if name == criteria.requests_metric:
            requests += value
        elif name == criteria.errors_metric:
            errors += value
        elif name in series:
            series[name].append(value)

    def mean(name: str) -> float | None:
        values = series[name]
        return sum(values) / len(values) if values else None

    return CohortMetrics(
        devices=devices,
        requests=requests,
        errors=errors,
        latency_p95_ms=mean(criteria.latency_metric),
        ttft_p95_ms=mean(criteria.ttft_metric),
        decode_tps=mean(criteria.decode_tps_metric),
    )


def _telemetry_problem(evidence: StepEvidence, criteria: AnalysisCriteria) -> str | None:
    canary, base = evidence.canary, evidence.baseline
    if canary.requests < criteria.min_requests or base.requests < criteria.min_requests:
        return None  # not enough traffic on one side to compare; update outcomes decide
    if criteria.max_error_rate_increase is not None:
        new, old = canary.error_rate, base.error_rate
        if new is not None and old is not None and new - old > criteria.max_error_rate_increase:
            return (
                f"error rate {new:.1%} on {evidence.version} vs {old:.1%} on the previous version "
                f"(allowed increase {criteria.max_error_rate_increase:.1%})"
            )
    if criteria.max_latency_increase is not None:
        new_p95, old_p95 = canary.latency_p95_ms, base.latency_p95_ms
        if new_p95 is not None and old_p95 is not None and new_p95 > old_p95 * (1 + criteria.max_latency_increase):
            return (
                f"p95 latency {new_p95:.1f} ms on {evidence.version} vs {old_p95:.1f} ms on the previous version "
                f"(allowed increase {criteria.max_latency_increase:.0%})"
            )
    return _generation_problem(evidence, criteria)


def _generation_problem(evidence: StepEvidence, criteria: AnalysisCriteria) -> str | None:
    """Compare a text-generation canary's time to first token and decode speed with the previous version."""
    canary, base = evidence.canary, evidence.baseline
    if criteria.max_ttft_increase is not None:
        new, old = canary.ttft_p95_ms, base.ttft_p95_ms
        if new is not None and old is not None and new > old * (1 + criteria.max_ttft_increase):
            return (
                f"time to first token (p95) {new:.1f} ms on {evidence.version} vs {old:.1f} ms on the previous version "
                f"(allowed increase {criteria.max_ttft_increase:.0%})"
            )
    if criteria.max_decode_tps_drop is not None:
        new, old = canary.decode_tps, base.decode_tps
        if new is not None and old is not None and new < old * (1 - criteria.max_decode_tps_drop):
            return (
                f"decode {new:.1f} tokens/s on {evidence.version} vs {old:.1f} tokens/s on the previous version "
                f"(allowed drop {criteria.max_decode_tps_drop:.0%})"
            )
    return None


def analyse(evidence: StepEvidence, criteria: AnalysisCriteria) -> Verdict:
    """Judge one step: FAIL on failed updates or degraded telemetry, PASS when healthy long enough."""
    outcomes = [classify(obs, evidence.version) for obs in evidence.devices]
    updated = outcomes.count(Outcome.UPDATED)
    failed = outcomes.count(Outcome.FAILED)
    pending = outcomes.count(Outcome.PENDING)
    counts = {"updated": updated, "failed": failed, "pending": pending}

    settled = updated + failed
    if failed and failed / settled > criteria.max_failed_ratio:
        errors = sorted(
            {o.error for o, c in zip(evidence.devices, outcomes, strict=True) if c is Outcome.FAILED and o.error}
        )
        detail = f": {errors[0]}" if errors else ""
        return Verdict(
            VerdictKind.FAIL,
            f"{failed} of {settled} devices failed to update to {evidence.version}{detail}",
            **counts,
        )
    problem = _telemetry_problem(evidence, criteria)
    if problem is not None:
        return Verdict(VerdictKind.FAIL, problem, **counts)

    timed_out = evidence.elapsed_s >= criteria.update_timeout_s
    needed = min(criteria.min_devices_reporting, len(evidence.devices))
    if updated < needed:
        if timed_out:
            return Verdict(
                VerdictKind.FAIL,
                f"only {updated} of {needed} required devices run {evidence.version} "
                f"after {criteria.update_timeout_s:.0f}s",
                **counts,
            )
        return Verdict(VerdictKind.WAIT, f"{updated} of {needed} required devices run {evidence.version}", **counts)
    waiting_online = _pending_online(evidence.devices, outcomes)
    if waiting_online and not timed_out:
        return Verdict(VerdictKind.WAIT, f"{len(waiting_online)} online devices still updating", **counts)
    hold = max(criteria.min_observation_s, evidence.hold_s)
    if evidence.elapsed_s < hold:
        return Verdict(VerdictKind.WAIT, f"observing ({evidence.elapsed_s:.0f}s of {hold:.0f}s)", **counts)
    return Verdict(VerdictKind.PASS, f"{updated} devices run {evidence.version}, analysis healthy", **counts)


def _pending_online(devices: Sequence[DeviceObservation], outcomes: Sequence[Outcome]) -> list[str]:
    return [o.device_id for o, c in zip(devices, outcomes, strict=True) if c is Outcome.PENDING and o.online]
