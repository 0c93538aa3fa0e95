"""Rollouts: move a fleet to a model version step by step, judge each step, promote or roll back.

spec (what is asked), plan (pure cohorts, steps and the state machine), engine (one reconcile pass),
analysis and telemetry (is a step healthy), queries (read models the API and UI share), history
(deployment history per device), controller (the background loop and its wake-up).
"""

from __future__ import annotations

from hub.rollouts.analysis import (
    CohortMetrics,
    DeviceObservation,
    Outcome,
    StepEvidence,
    Verdict,
    VerdictKind,
    aggregate_metrics,
    analyse,
    classify,
    observe,
)
from hub.rollouts.controller import RolloutController, RolloutSettings, install, republish
from hub.rollouts.engine import (
    DeviceState,
    RolloutConflictError,
    RolloutContext,
    RolloutStateError,
    act,
    advance,
    complete_reverts,
    create_rollout,
)
from hub.rollouts.history import DESIRED, RAN, latest_entries, record_changes
from hub.rollouts.plan import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Event,
    InvalidTransition,
    RolloutState,
    Transition,
    cohort_rank,
    order_devices,
    planned_devices,
    step_count,
    transition,
)
from hub.rollouts.queries import (
    UnknownRolloutError,
    active_rollout_ids,
    chunks,
    device_history,
    events_of,
    get_rollout,
    list_rollouts,
    members_of,
    read_spec,
)
from hub.rollouts.spec import AnalysisCriteria, RolloutSpec, Selector, Strategy
from hub.rollouts.telemetry import cohort_metrics

__all__ = [
    "ACTIVE_STATES",
    "AnalysisCriteria",
    "CohortMetrics",
    "DESIRED",
    "DeviceObservation",
    "DeviceState",
    "Event",
    "InvalidTransition",
    "Outcome",
    "RAN",
    "RolloutConflictError",
    "RolloutContext",
    "RolloutController",
    "RolloutSettings",
    "RolloutSpec",
    "RolloutState",
    "RolloutStateError",
    "Selector",
    "StepEvidence",
    "Strategy",
    "TERMINAL_STATES",
    "Transition",
    "UnknownRolloutError",
    "Verdict",
    "VerdictKind",
    "act",
    "active_rollout_ids",
    "advance",
    "aggregate_metrics",
    "analyse",
    "chunks",
    "classify",
    "cohort_metrics",
    "cohort_rank",
    "complete_reverts",
    "create_rollout",
    "device_history",
    "events_of",
    "get_rollout",
    "install",
    "latest_entries",
    "list_rollouts",
    "members_of",
    "observe",
    "order_devices",
    "planned_devices",
    "read_spec",
    "record_changes",
    "republish",
    "step_count",
    "transition",
]
