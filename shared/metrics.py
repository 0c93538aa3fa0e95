"""Names of the serving telemetry an agent sends and the hub's rollout analysis reads.

Per model version and per reporting interval, an agent sends one `TelemetryPoint` of
each: `REQUESTS` (requests served in the interval), `ERRORS` (requests that failed in the
interval) and `LATENCY_P95_MS` (95th percentile of request latency in the interval, in
milliseconds), each labelled ``{MODEL_LABEL: name, VERSION_LABEL: version}``. The hub
compares devices on a rollout's new version with devices still on the previous one.

Where the time goes, per model version and interval (same labels): `QUEUE_P50_MS` and
`QUEUE_P95_MS` (time a request waited for its run, dynamic batching included),
`COMPUTE_P50_MS` and `COMPUTE_P95_MS` (time of each `session.run`), `BATCHES` (runs) and
`BATCH_SIZE_MEAN` (rows per run).
"""

from __future__ import annotations

__all__ = [
    "BATCHES",
    "BATCH_SIZE_MEAN",
    "COMPUTE_P50_MS",
    "COMPUTE_P95_MS",
    "ERRORS",
    "LATENCY_P95_MS",
    "MODEL_LABEL",
    "QUEUE_P50_MS",
    "QUEUE_P95_MS",
    "REQUESTS",
    "VERSION_LABEL",
    "serving_labels",
]

REQUESTS = "requests"
ERRORS = "errors"
LATENCY_P95_MS = "latency_p95_ms"
QUEUE_P50_MS = "queue_p50_ms"
QUEUE_P95_MS = "queue_p95_ms"
COMPUTE_P50_MS = "compute_p50_ms"
COMPUTE_P95_MS = "compute_p95_ms"
BATCHES = "batches"
BATCH_SIZE_MEAN = "batch_size_mean"
MODEL_LABEL = "model"
VERSION_LABEL = "version"


def serving_labels(model: str, version: str) -> dict[str, str]:
    """Return the labels of a serving metric of one model version."""
    return {MODEL_LABEL: model, VERSION_LABEL: version}
