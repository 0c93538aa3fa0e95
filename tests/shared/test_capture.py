"""The capture wire contract: content addresses, batch bounds, JSON round trip."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from shared.capture import CaptureBatch, CaptureItem, CapturePolicy, CaptureReason, capture_path, item_id


def test_item_ids_depend_on_content_model_and_version() -> None:
    base = item_id(b"x", "digits", "1.0.0")
    assert base == item_id(b"x", "digits", "1.0.0")
    assert (
        len({base, item_id(b"y", "digits", "1.0.0"), item_id(b"x", "other", "1.0.0"), item_id(b"x", "digits", "1.0.1")})
        == 4
    )


def test_a_batch_round_trips_and_is_bounded() -> None:
    item = CaptureItem(
        id=item_id(b"{}", "digits", "1.0.0"),
        model="digits",
        version="1.0.0",
        reason=CaptureReason.SMALL_MARGIN,
        content_b64=base64.b64encode(b"{}").decode(),
        captured_at=datetime.now(UTC),
    )
    batch = CaptureBatch(device_id="cam-1", items=[item])
    assert CaptureBatch.model_validate_json(batch.model_dump_json()) == batch
    with pytest.raises(ValidationError):
        CaptureBatch(device_id="cam-1", items=[item] * 65)
    with pytest.raises(ValidationError):
        CaptureBatch(device_id="cam-1", items=[])
    assert capture_path("cam-1") == "/devices/cam-1/captures"


def test_policy_round_trips() -> None:
    policy = CapturePolicy(min_confidence=0.6, sample_rate=0.01, daily_cap=50)
    assert CapturePolicy.model_validate_json(policy.model_dump_json()) == policy
