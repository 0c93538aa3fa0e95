"""Table-driven tests of the pure rollout logic: spec, cohorts, planner, state machine, analysis."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from pydantic import ValidationError

from hub.rollouts.analysis import (
    CohortMetrics,
    DeviceObservation,
    Outcome,
    StepEvidence,
    VerdictKind,
    aggregate_metrics,
    analyse,
    classify,
    observe,
)
from hub.rollouts.plan import (
    Event,
    InvalidTransition,
    RolloutState,
    cohort_rank,
    order_devices,
    planned_devices,
    step_count,
    transition,
)
from hub.rollouts.spec import AnalysisCriteria, RolloutSpec, Selector, Strategy
from shared.messages import UpdateState

S = RolloutState
E = Event

# --- spec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"model": "m", "version": "1.0.0", "steps": [50, 10, 100]}, "increase"),
        ({"model": "m", "version": "1.0.0", "steps": [10, 50]}, "last step must be 100"),
        ({"model": "m", "version": "1.0.0", "steps": [0, 100]}, "(0, 100]"),
        ({"model": "m", "version": "1.0.0", "steps": [10, 150]}, "(0, 100]"),
        ({"model": "m", "version": "one"}, "pattern"),
        ({"model": "bad/name", "version": "1.0.0"}, "invalid model name"),
        ({"model": "m", "version": "1.0.0", "selector": {}}, "give all=true"),
        ({"model": "m", "version": "1.0.0", "selector": {"all": True, "labels": {"a": "b"}}}, "excludes"),
        ({"model": "m", "version": "1.0.0", "selector": {"device_ids": ["a b"]}}, "invalid device id"),
        ({"model": "m", "version": "1.0.0", "surprise": 1}, "Extra inputs"),
    ],
)
def test_spec_rejects_bad_requests(body: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace("]", r"\]")):
        RolloutSpec.model_validate(body)


def test_spec_defaults_and_all_at_once() -> None:
    spec = RolloutSpec(model="m", version="1.2.0")
    assert spec.strategy is Strategy.CANARY and spec.steps == [10, 50, 100] and spec.selector.all
    assert RolloutSpec(model="m", version="1.2.0", strategy=Strategy.ALL_AT_ONCE, steps=[5, 7]).steps == [100]


@pytest.mark.parametrize(
    ("selector", "device", "labels", "expected"),
    [
        (Selector(all=True), "d1", {}, True),
        (Selector(device_ids=["d1", "d2"]), "d1", {}, True),
        (Selector(device_ids=["d1", "d2"]), "d3", {}, False),
        (Selector(labels={"site": "a"}), "d3", {"site": "a", "hw": "pi"}, True),
        (Selector(labels={"site": "a", "hw": "jetson"}), "d3", {"site": "a", "hw": "pi"}, False),
        (Selector(labels={"site": "a"}, device_ids=["d9"]), "d9", {"site": "b"}, True),
    ],
)
def test_selector_matches(selector: Selector, device: str, labels: dict[str, str], expected: bool) -> None:
    assert selector.matches(device, labels) is expected


FLEET = [("d1", {"site": "a"}), ("d2", {"site": "b"})]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (Selector(all=True), Selector(device_ids=["zz"]), True),
        (Selector(device_ids=["d1"]), Selector(device_ids=["d1", "d2"]), True),
        (Selector(device_ids=["d1"]), Selector(device_ids=["d2"]), False),
        (Selector(labels={"site": "a"}), Selector(labels={"site": "b"}), False),
        (Selector(labels={"site": "a"}), Selector(labels={"hw": "pi"}), True),  # a future device may have both
        (Selector(labels={"site": "a"}), Selector(device_ids=["d1"]), True),  # d1 is in site a
        (Selector(labels={"site": "a"}), Selector(device_ids=["d2"]), False),
    ],
)
def test_selector_overlap(a: Selector, b: Selector, expected: bool) -> None:
    assert a.overlaps(b, FLEET) is expected
    assert b.overlaps(a, FLEET) is expected


# --- cohorts and planner ----------------------------------------------------------------


def test_cohort_order_is_stable_and_depends_on_the_rollout() -> None:
    devices = [f"dev-{i}" for i in range(200)]
    first = order_devices(devices, "r1")
    assert order_devices(reversed(devices), "r1") == first  # input order does not matter
    assert sorted(first) == sorted(devices)
    assert order_devices(devices, "r2") != first  # another rollout hits other devices first
    assert first == sorted(devices, key=lambda d: cohort_rank(d, "r1"))
    # A restarted hub or another replica must pick the same cohorts: the rank may not depend on
    # anything of one interpreter (Python's salted hash() would).
    code = "import sys; from hub.rollouts.plan import order_devices; print(*order_devices(sys.argv[1:], 'r1'))"
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code, *devices],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert other.stdout.split() == first
    # An enrolling device does not reorder the others.
    grown = order_devices([*devices, "dev-new"], "r1")
    assert [d for d in grown if d != "dev-new"] == first


def test_cohorts_spread_evenly() -> None:
    # Over many rollouts, the first 10% picks every device about equally often.
    devices = [f"d{i}" for i in range(20)]
    hits: Counter[str] = Counter()
    for r in range(500):
        hits.update(order_devices(devices, f"r{r}")[:2])
    assert min(hits.values()) > 20 and max(hits.values()) < 90


@pytest.mark.parametrize(
    ("total", "percent", "expected"),
    [(0, 10, 0), (5, 10, 1), (5, 50, 3), (5, 100, 5), (30, 10, 3), (10, 1, 1), (1000, 12.5, 125), (3, 0, 0)],
)
def test_step_count(total: int, percent: float, expected: int) -> None:
    assert step_count(total, percent) == expected


def test_planned_devices_keeps_moved_devices() -> None:
    ordered = order_devices([f"d{i}" for i in range(10)], "r")
    assert planned_devices(ordered, 20) == set(ordered[:2])
    assert planned_devices(ordered, 20, already_moved=["x"]) == {*ordered[:2], "x"}
    steps = [planned_devices(ordered, p) for p in (10, 50, 100)]
    assert steps[0] < steps[1] < steps[2] == set(ordered)


# --- state machine ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "step", "event", "expected_state", "expected_step", "revert"),
    [
        (S.PENDING, 0, E.START, S.RUNNING, 0, False),
        (S.RUNNING, 0, E.STEP_PASSED, S.RUNNING, 1, False),
        (S.RUNNING, 2, E.STEP_PASSED, S.SUCCEEDED, 2, False),
        (S.RUNNING, 1, E.STEP_FAILED, S.FAILED, 1, True),
        (S.RUNNING, 1, E.PAUSE, S.PAUSED, 1, False),
        (S.PENDING, 0, E.PAUSE, S.PAUSED, 0, False),
        (S.PAUSED, 1, E.RESUME, S.RUNNING, 1, False),
        (S.PAUSED, 1, E.PROMOTE, S.SUCCEEDED, 2, False),
        (S.RUNNING, 0, E.PROMOTE, S.SUCCEEDED, 2, False),
        (S.RUNNING, 1, E.ABORT, S.ABORTED, 1, True),
        (S.PAUSED, 1, E.ABORT, S.ABORTED, 1, True),
        (S.PENDING, 0, E.ABORT, S.ABORTED, 0, True),
    ],
)
def test_transitions(
    state: RolloutState, step: int, event: Event, expected_state: RolloutState, expected_step: int, revert: bool
) -> None:
    result = transition(state, step, 3, event)
    assert (result.state, result.step, result.revert) == (expected_state, expected_step, revert)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (S.RUNNING, E.RESUME),
        (S.PAUSED, E.PAUSE),
        (S.PAUSED, E.STEP_PASSED),  # a paused rollout does not advance
        (S.PAUSED, E.STEP_FAILED),
        (S.RUNNING, E.START),
        *((terminal, event) for terminal in (S.SUCCEEDED, S.FAILED, S.ABORTED) for event in Event),
    ],
)
def test_invalid_transitions(state: RolloutState, event: Event) -> None:
    with pytest.raises(InvalidTransition, match=event.value):
        transition(state, 1, 3, event)


# --- analysis ---------------------------------------------------------------------------

V = "2.0.0"
FAST = AnalysisCriteria(min_devices_reporting=1, min_observation_s=30, update_timeout_s=300)


def dev(
    i: int, active: str | None, state: UpdateState | None, online: bool = True, error: str | None = None
) -> DeviceObservation:
    return DeviceObservation(f"d{i}", online, active=active, desired=V, state=state, error=error)


UP = UpdateState.ACTIVE
RB = UpdateState.ROLLED_BACK
DL = UpdateState.DOWNLOADING


@pytest.mark.parametrize(
    ("obs", "expected"),
    [
        (DeviceObservation("d", True, active=V, desired=V, state=UpdateState.COMMITTED), Outcome.UPDATED),
        (DeviceObservation("d", True, active=V, desired=V, state=UP), Outcome.UPDATED),
        (DeviceObservation("d", True, active="1.0.0", desired=V, state=RB, error="smoke"), Outcome.FAILED),
        (DeviceObservation("d", True, active="1.0.0", desired="1.5.0", state=RB), Outcome.PENDING),  # old failure
        (DeviceObservation("d", True, active="1.0.0", desired=V, state=DL), Outcome.PENDING),
        (DeviceObservation("d", False), Outcome.PENDING),
    ],
)
def test_classify(obs: DeviceObservation, expected: Outcome) -> None:
    assert classify(obs, V) is expected


HEALTHY = CohortMetrics(devices=2, requests=1000, errors=5, latency_p95_ms=10.0)


@pytest.mark.parametrize(
    ("devices", "elapsed", "canary", "baseline", "criteria", "kind", "reason"),
    [
        # every step device runs V, observed long enough, telemetry alike: pass
        ((dev(1, V, UP), dev(2, V, UP)), 60, HEALTHY, HEALTHY, FAST, VerdictKind.PASS, "healthy"),
        # not observed long enough yet
        ((dev(1, V, UP),), 10, HEALTHY, HEALTHY, FAST, VerdictKind.WAIT, "observing"),
        # one online device still downloading holds the step
        ((dev(1, V, UP), dev(2, "1.0.0", DL)), 60, HEALTHY, HEALTHY, FAST, VerdictKind.WAIT, "still updating"),
        # ...but not past the update timeout
        ((dev(1, V, UP), dev(2, "1.0.0", DL)), 301, HEALTHY, HEALTHY, FAST, VerdictKind.PASS, "healthy"),
        # an offline device does not hold the step
        ((dev(1, V, UP), dev(2, None, None, online=False)), 60, HEALTHY, HEALTHY, FAST, VerdictKind.PASS, "1 devices"),
        # nobody reports yet: wait, then fail at the timeout
        ((dev(1, None, DL),), 60, HEALTHY, HEALTHY, FAST, VerdictKind.WAIT, "0 of 1"),
        ((dev(1, None, DL),), 300, HEALTHY, HEALTHY, FAST, VerdictKind.FAIL, "only 0 of 1"),
        # a smoke-test rollback fails the step at once, with the agent's error
        (
            (dev(1, V, UP), dev(2, "1.0.0", RB, error="smoke test failed")),
            1,
            HEALTHY,
            HEALTHY,
            FAST,
            VerdictKind.FAIL,
            "1 of 2 devices failed to update to 2.0.0: smoke test failed",
        ),
        # a tolerated failure ratio
        (
            (dev(1, V, UP), dev(2, "1.0.0", RB)),
            60,
            HEALTHY,
            HEALTHY,
            FAST.model_copy(update={"max_failed_ratio": 0.5}),
            VerdictKind.PASS,
            "healthy",
        ),
        # p95 latency 3x the baseline: fail, even before the observation time is over
        ((dev(1, V, UP),), 5, CohortMetrics(1, 500, 0, 30.0), HEALTHY, FAST, VerdictKind.FAIL, "p95 latency 30.0 ms"),
        # +40% latency is within the default +50%
        ((dev(1, V, UP),), 60, CohortMetrics(1, 500, 0, 14.0), HEALTHY, FAST, VerdictKind.PASS, "healthy"),
        # error rate 20% vs 0.5%
        ((dev(1, V, UP),), 60, CohortMetrics(1, 100, 20, 10.0), HEALTHY, FAST, VerdictKind.FAIL, "error rate 20.0%"),
        # too little traffic on the canary side: telemetry is not compared
        ((dev(1, V, UP),), 60, CohortMetrics(1, 0, 0, 99.0), HEALTHY, FAST, VerdictKind.PASS, "healthy"),
        # no baseline (the 100% step): telemetry is not compared
        ((dev(1, V, UP),), 60, CohortMetrics(1, 100, 50, 99.0), CohortMetrics(), FAST, VerdictKind.PASS, "healthy"),
        # latency check switched off
        (
            (dev(1, V, UP),),
            60,
            CohortMetrics(1, 500, 0, 99.0),
            HEALTHY,
            FAST.model_copy(update={"max_latency_increase": None}),
            VerdictKind.PASS,
            "healthy",
        ),
        # text generation: time to first token 2x the previous version's
        (
            (dev(1, V, UP),),
            60,
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=200.0, decode_tps=100.0),
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=100.0, decode_tps=100.0),
            FAST,
            VerdictKind.FAIL,
            "time to first token (p95) 200.0 ms",
        ),
        # text generation: decoding 40% slower than the previous version
        (
            (dev(1, V, UP),),
            60,
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=100.0, decode_tps=60.0),
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=100.0, decode_tps=100.0),
            FAST,
            VerdictKind.FAIL,
            "decode 60.0 tokens/s",
        ),
        # text generation within bounds (faster decoding is never a problem)
        (
            (dev(1, V, UP),),
            60,
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=120.0, decode_tps=180.0),
            CohortMetrics(1, 500, 0, 10.0, ttft_p95_ms=100.0, decode_tps=100.0),
            FAST,
            VerdictKind.PASS,
            "healthy",
        ),
    ],
)
def test_analyse(
    devices: tuple[DeviceObservation, ...],
    elapsed: float,
    canary: CohortMetrics,
    baseline: CohortMetrics,
    criteria: AnalysisCriteria,
    kind: VerdictKind,
    reason: str,
) -> None:
    verdict = analyse(StepEvidence(V, devices, elapsed, canary=canary, baseline=baseline), criteria)
    assert verdict.kind is kind, verdict.reason
    assert reason in verdict.reason


def test_step_pause_holds_a_healthy_step() -> None:
    evidence = StepEvidence(V, (dev(1, V, UP),), elapsed_s=60, hold_s=120)
    assert analyse(evidence, FAST).kind is VerdictKind.WAIT
    assert analyse(StepEvidence(V, (dev(1, V, UP),), elapsed_s=121, hold_s=120), FAST).kind is VerdictKind.PASS


def test_observe_reads_stored_reported_state() -> None:
    reported = {"models": {"m": {"active": V, "desired": V, "state": "committed"}, "other": {}}}
    assert observe("d", True, reported, "m") == DeviceObservation("d", True, V, V, UpdateState.COMMITTED)
    assert observe("d", False, None, "m") == DeviceObservation("d", False)
    assert observe("d", True, {"models": {"m": "junk"}}, "m") == DeviceObservation("d", True)
    assert observe("d", True, {"models": {"m": {"state": "exploded"}}}, "m").state is None


def test_aggregate_metrics() -> None:
    points = [
        ("a", "requests", 10),
        ("a", "errors", 1),
        ("b", "requests", 30),
        ("a", "latency_p95_ms", 4),
        ("b", "latency_p95_ms", 8),
        ("b", "cpu", 99),
    ]
    metrics = aggregate_metrics(points, AnalysisCriteria(), devices=2)
    assert metrics == CohortMetrics(devices=2, requests=40, errors=1, latency_p95_ms=6.0)
    generation = [*points, ("a", "ttft_p95_ms", 50), ("b", "ttft_p95_ms", 70), ("a", "decode_tokens_per_s", 90)]
    lm = aggregate_metrics(generation, AnalysisCriteria(), devices=2)
    assert (lm.ttft_p95_ms, lm.decode_tps) == (60.0, 90.0)
    assert metrics.error_rate == pytest.approx(0.025)
    assert aggregate_metrics([], AnalysisCriteria(), devices=0).latency_p95_ms is None


def test_analysis_defaults_read_the_shared_metric_names() -> None:
    from shared import metrics

    criteria = AnalysisCriteria()
    assert (criteria.requests_metric, criteria.errors_metric, criteria.latency_metric) == (
        metrics.REQUESTS,
        metrics.ERRORS,
        metrics.LATENCY_P95_MS,
    )
