"""Telemetry payload -> database rows, without building a pydantic model per point.

Telemetry is most of what the hub ingests, and constructing a ``TelemetryPoint`` object
per point (then a dict per row) cost more than the insert. `decode_telemetry` validates
the same rules as ``shared.messages.TelemetryBatch`` with a TypedDict adapter straight
from JSON bytes into plain dicts. A payload it refuses goes through
``shared.codec.decode`` so the error (and the reason it is counted under) is exactly
the contract's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from shared import codec
from shared.messages import TelemetryBatch

__all__ = ["TelemetryRows", "decode_telemetry"]


# What every agent sends (pydantic's own UTC form); anything else takes the full path.
_CANONICAL_TS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$"


class _Point(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    seq: Annotated[int, Field(ge=0)]
    ts: Annotated[str, Field(pattern=_CANONICAL_TS)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    value: float
    labels: Annotated[dict[str, str], Field(max_length=16)]


class _Batch(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    schema_version: Literal[1]
    kind: Literal["telemetry"]
    device_id: Annotated[str, Field(min_length=1, max_length=128)]  # shared.messages.Id
    points: Annotated[list[_Point], Field(min_length=1, max_length=5000)]


_ADAPTER: TypeAdapter[_Batch] | None = None


def _adapter() -> TypeAdapter[_Batch]:
    global _ADAPTER  # built on first use: no work at import time
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(_Batch)
    return _ADAPTER


@dataclass(frozen=True)
class TelemetryRows:
    """A validated telemetry batch as rows of the telemetry_point table.

    A row's ``ts`` is a datetime, or (from the fast path) already the string SQLite stores.
    """

    device_id: str
    rows: list[dict[str, Any]]
    kind: str = "telemetry"

    @property
    def count(self) -> int:
        """Return the number of points."""
        return len(self.rows)


def decode_telemetry(raw: bytes, *, max_bytes: int = codec.DEFAULT_MAX_BYTES) -> TelemetryRows:
    """Validate a telemetry payload; raise shared.codec.ProtocolError as `codec.decode` would."""
    if len(raw) > max_bytes:
        raise codec.ProtocolError("too_large", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        batch = _adapter().validate_json(raw)
        device_id = batch["device_id"]
        rows: list[dict[str, Any]] = batch["points"]  # type: ignore[assignment]
        # The points of one collection round share their time: convert each distinct one once.
        converted: dict[str, str] = {}
        for row in rows:
            ts = row["ts"]
            text = converted.get(ts)
            if text is None:
                text = converted[ts] = _sqlite_ts(ts)
            row["ts"] = text
            row["device_id"] = device_id
    except ValueError:  # pydantic's ValidationError, or a canonical-looking but impossible time
        # The contract's decoder names the precise reason (and accepts whatever it accepts).
        model = codec.decode(raw, TelemetryBatch, max_bytes=max_bytes)
        return TelemetryRows(model.device_id, [{"device_id": model.device_id, **p.model_dump()} for p in model.points])
    return TelemetryRows(device_id, rows)


def _sqlite_ts(ts: str) -> str:
    """Return canonical ``YYYY-MM-DDTHH:MM:SS[.f]Z`` as SQLAlchemy stores UTC in SQLite; check it is a real time."""
    datetime.fromisoformat(ts[:-1])  # ValueError for 2026-13-45
    fraction = ts[20:-1]
    return f"{ts[:10]} {ts[11:19]}.{fraction}{'0' * (6 - len(fraction))}"
