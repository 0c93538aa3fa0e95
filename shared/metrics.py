"""Names of the serving telemetry an agent sends and the hub's rollout analysis reads.

Per model version and per reporting interval, an agent sends one `TelemetryPoint` of
each: `REQUESTS` (requests served in the interval), `ERRORS` (requests that failed in the
interval) and `LATENCY_P95_MS` (95th percentile of request latency in the interval, in
milliseconds), each labelled ``{MODEL_LABEL: name, VERSION_LABEL: version}``. The hub
compares devices on a rollout's new version with devices still on the previous one.

A text-generation model adds, per version and interval: `TTFT_P95_MS` (time to first
token, 95th percentile; a generation's `LATENCY_P95_MS` is its time to first token too,
since its whole duration depends on the length asked for), `DECODE_TPS` (median decode
tokens per second of the interval's requests), `TOKENS_IN` and `TOKENS_OUT` (prompt and
generated tokens in the interval).
"""

from __future__ import annotations

__all__ = [
    "DECODE_TPS",
    "ERRORS",
    "LATENCY_P95_MS",
    "MODEL_LABEL",
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
TTFT_P95_MS = "ttft_p95_ms"
DECODE_TPS = "decode_tokens_per_s"
TOKENS_IN = "tokens_in"
TOKENS_OUT = "tokens_out"
MODEL_LABEL = "model"
VERSION_LABEL = "version"


def serving_labels(model: str, version: str) -> dict[str, str]:
    """Return the labels of a serving metric of one model version."""
    return {MODEL_LABEL: model, VERSION_LABEL: version}
