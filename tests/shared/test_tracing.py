"""Trace context on the wire (W3C traceparent) and the tracing facade: free when off, joined when on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared import tracing
from shared.tracecontext import TraceParent, from_user_properties, parse

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-{SPAN}-01", TraceParent(int(TRACE, 16), int(SPAN, 16), 1)),
        (f"00-{TRACE}-{SPAN}-00", TraceParent(int(TRACE, 16), int(SPAN, 16), 0)),
        (f"  00-{TRACE}-{SPAN}-01 ", TraceParent(int(TRACE, 16), int(SPAN, 16), 1)),
        (f"00-{TRACE}-{SPAN}-01".encode(), TraceParent(int(TRACE, 16), int(SPAN, 16), 1)),
        # A later version may append fields; a version-00 reader keeps the four it knows.
        (f"01-{TRACE}-{SPAN}-01-extra", TraceParent(int(TRACE, 16), int(SPAN, 16), 1)),
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is forbidden
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # upper-case hex is not allowed
        (f"00-{TRACE[:-1]}-{SPAN}-01", None),  # short trace id
        (f"00-{TRACE}-{SPAN}-1", None),
        (f"00-{TRACE}-{SPAN}-01" + "x" * 600, None),
        (b"\xff\xfe", None),
    ],
)
def test_parse_traceparent(header: str | bytes | None, expected: TraceParent | None) -> None:
    assert parse(header) == expected


def test_format_round_trips() -> None:
    value = f"00-{TRACE}-{SPAN}-01"
    parsed = parse(value)
    assert parsed is not None and parsed.format() == value and parsed.sampled


def test_traceparent_from_mqtt_user_properties() -> None:
    assert from_user_properties([("other", "x"), ("traceparent", f"00-{TRACE}-{SPAN}-01")]) == parse(
        f"00-{TRACE}-{SPAN}-01"
    )
    assert from_user_properties([("traceparent", "bad")]) is None
    assert from_user_properties(None) is None
    assert from_user_properties([]) is None


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ],
)
def test_tracing_is_wanted_only_when_otel_variables_say_so(env: dict[str, str], wanted: bool) -> None:
    assert tracing.wanted(env) is wanted


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**clean, **env}, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


OFF = """
import sys
from shared import tracing
assert tracing.configure("probe") is False
with tracing.span("a", {"k": 1}):
    assert tracing.current() is None and tracing.user_properties() == [] and tracing.capture() is None
assert tracing.span("a") is tracing.span("b")  # one shared no-op: nothing allocated per span
print("LOADED" if any(m.startswith("opentelemetry") for m in sys.modules) else "FREE")
"""


def test_tracing_off_imports_nothing_and_spans_are_no_ops() -> None:
    assert _run(OFF).strip() == "FREE"


ON = f"""
from shared import tracing
from shared.tracecontext import parse
assert tracing.configure("probe") is True
parent = parse("00-{TRACE}-{SPAN}-01")
with tracing.span("root", parent=parent):
    current = tracing.current()
    assert current.trace_id == parent.trace_id and current.span_id != parent.span_id
    (key, value), = tracing.user_properties()
    assert key == "traceparent" and parse(value) == current
with tracing.remote(parse("not a traceparent")), tracing.span("fresh"):
    assert tracing.current().trace_id != parent.trace_id  # a malformed parent starts a new trace
@tracing.traced("decorated")
def step(x):
    return tracing.current(), x * 2
with tracing.remote(parent):
    inner, doubled = step(21)
assert doubled == 42 and inner.trace_id == parent.trace_id and step.__name__ == "step"
tracing.shutdown()
print("STATS", tracing.stats())
"""


def test_tracing_on_joins_a_remote_parent_and_exports() -> None:
    out = _run(ON, OTEL_TRACES_EXPORTER="console")
    assert '"name": "root"' in out and f'"trace_id": "0x{TRACE}"' in out and f'"parent_id": "0x{SPAN}"' in out
    assert '"name": "decorated"' in out
    assert "STATS {'exported': 3, 'failed': 0, 'dropped': 0}" in out


def test_a_bad_otel_setting_leaves_tracing_off_and_the_process_running() -> None:
    code = "from shared import tracing\nprint(tracing.configure('probe'))"
    assert (
        _run(code, OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_EXPORTER_OTLP_PROTOCOL="carrier-pigeon").strip()
        == "False"
    )
    assert _run(code, OTEL_TRACES_EXPORTER="zipkin").strip() == "False"
