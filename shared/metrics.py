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

A text-generation model adds, per version and interval: `TTFT_P95_MS` (time to first
token, 95th percentile; a generation's `LATENCY_P95_MS` is its time to first token too,
since its whole duration depends on the length asked for), `DECODE_TPS` (median decode
tokens per second of the interval's requests), `TOKENS_IN` and `TOKENS_OUT` (prompt and
generated tokens in the interval).
"""

from __future__ import annotations

__all__ = [
    "BATCHES",
    "BATCH_SIZE_MEAN",
    "COMPUTE_P50_MS",
    "COMPUTE_P95_MS",
    "DECODE_TPS",
    "ERRORS",
    "LATENCY_P95_MS",
    "MODEL_LABEL",
    "QUEUE_P50_MS",
    "QUEUE_P95_MS",
    "REQUESTS",
    "TOKENS_IN",
    "TOKENS_OUT",
    "TTFT_P95_MS",
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
TTFT_P95_MS = "ttft_p95_ms"
DECODE_TPS = "decode_tokens_per_s"
TOKENS_IN = "tokens_in"
TOKENS_OUT = "tokens_out"
MODEL_LABEL = "model"
VERSION_LABEL = "version"


def serving_labels(model: str, version: str) -> dict[str, str]:
    """Return the labels of a serving metric of one model version."""
    return {MODEL_LABEL: model, VERSION_LABEL: version}
