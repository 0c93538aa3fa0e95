"""Names of the serving telemetry an agent sends and the hub's rollout analysis reads.

Per model version and per reporting interval, an agent sends one `TelemetryPoint` of
each: `REQUESTS` (requests served in the interval), `ERRORS` (requests that failed in the
interval) and `LATENCY_P95_MS` (95th percentile of request latency in the interval, in
milliseconds), each labelled ``{MODEL_LABEL: name, VERSION_LABEL: version}``. The hub
compares devices on a rollout's new version with devices still on the previous one.
"""

from __future__ import annotations

__all__ = ["ERRORS", "LATENCY_P95_MS", "MODEL_LABEL", "REQUESTS", "VERSION_LABEL", "serving_labels"]

REQUESTS = "requests"
ERRORS = "errors"
LATENCY_P95_MS = "latency_p95_ms"
MODEL_LABEL = "model"
VERSION_LABEL = "version"


def serving_labels(model: str, version: str) -> dict[str, str]:
    """Return the labels of a serving metric of one model version."""
    return {MODEL_LABEL: model, VERSION_LABEL: version}
