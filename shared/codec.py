"""The only place where bytes become wire models, and wire models become bytes.

Errors::

    ProtocolError (ValueError)      reason is one of REASONS, for counting by cause
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, overload

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.messages import SCHEMA_VERSION, AnyMessage, Message

__all__ = ["DEFAULT_MAX_BYTES", "REASONS", "ProtocolError", "decode", "encode"]

DEFAULT_MAX_BYTES = 256 * 1024

REASONS = ("too_large", "malformed", "schema_version", "unknown_kind", "wrong_kind", "invalid")

M = TypeVar("M", bound=BaseModel)

_ANY = TypeAdapter[Message](AnyMessage)
_KINDS = {cls.model_fields["kind"].default: cls for cls in Message.__subclasses__() if "kind" in cls.model_fields}


class ProtocolError(ValueError):
    """A payload that is not a valid message; `reason` names the cause."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(message: BaseModel) -> bytes:
    """Serialize a wire model to compact UTF-8 JSON."""
    return message.model_dump_json(exclude_none=False).encode()


@overload
def decode(data: bytes | str, expected: None = None, *, max_bytes: int = ...) -> Message: ...
@overload
def decode(data: bytes | str, expected: type[M], *, max_bytes: int = ...) -> M: ...


def decode(
    data: bytes | str, expected: type[BaseModel] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> BaseModel:
    """Validate `data` as `expected` (or as any message, by its ``kind``).

    Raises ProtocolError naming the first thing wrong: size, JSON, schema version,
    kind, or the fields that failed validation.
    """
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ProtocolError("too_large", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        obj: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"expected a JSON object, got {type(obj).__name__}")

    is_message = expected is None or issubclass(expected, Message)
    if is_message:
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProtocolError("schema_version", f"schema_version {version!r}, this side speaks {SCHEMA_VERSION}")
        kind = obj.get("kind")
        if kind not in _KINDS:
            raise ProtocolError("unknown_kind", f"unknown message kind {kind!r}")
        if expected is not None and _KINDS[kind] is not expected:
            raise ProtocolError("wrong_kind", f"expected {expected.__name__}, got kind {kind!r}")
    try:
        if expected is None:
            return _ANY.validate_python(obj)
        return expected.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError("invalid", _summary(exc)) from exc


def _summary(exc: ValidationError) -> str:
    """Return the field errors of a ValidationError on one line."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
