"""W3C Trace Context `traceparent`: parse and format, and its place in MQTT 5 user properties.

The hub puts the `traceparent` of the span that published a desired state or a command in
the message's MQTT 5 user properties (never in the payload, so the wire schema is unchanged
and an agent without tracing ignores it). The agent HTTP API reads the same header from
clients. Anything malformed parses to None: a bad header is ignored, never an error.

    traceparent = version "-" trace-id "-" parent-id "-" trace-flags
                  2 hex       32 hex       16 hex        2 hex    (lower case)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["HEADER", "USER_PROPERTY", "TraceParent", "from_user_properties", "parse"]

HEADER = "traceparent"
USER_PROPERTY = "traceparent"  # the MQTT 5 user property name: the header's, so tools recognise it
MAX_LENGTH = 512  # a longer value is not a traceparent of any version; refuse before the regex

_PATTERN = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
SAMPLED = 0x01


@dataclass(frozen=True)
class TraceParent:
    """One parsed `traceparent`: the ids of the remote parent span and its flags."""

    trace_id: int
    span_id: int
    flags: int = SAMPLED

    @property
    def sampled(self) -> bool:
        """Return True when the caller recorded this trace."""
        return bool(self.flags & SAMPLED)

    def format(self) -> str:
        """Return the version-00 header value."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


def parse(value: str | bytes | None) -> TraceParent | None:
    """Return the parsed header, or None for a missing or malformed one (it is then ignored)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if len(value) > MAX_LENGTH:
        return None
    match = _PATTERN.fullmatch(value)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields. A later version may add
    # fields after a dash, which a version-00 reader skips (the spec's forward compatibility).
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceParent(trace_id, span_id, int(flags_hex, 16))


def from_user_properties(properties: Iterable[tuple[str, str]] | None) -> TraceParent | None:
    """Return the `traceparent` among MQTT 5 user properties (the first one; None if absent or bad)."""
    for key, value in properties or ():
        if key == USER_PROPERTY:
            return parse(value)
    return None
