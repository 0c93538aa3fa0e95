"""Hard-example capture: the per-model policy an operator sets and the upload a device sends.

The policy travels in the desired state's config (key ``capture``: model name -> policy); it
is off unless an operator asked. Captured items go to the hub over HTTP
(`capture_path(device_id)`), in batches, each item named by the sha256 of its content, so a
resent batch stores nothing twice.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.messages import Id, Version

__all__ = [
    "MAX_BATCH_ITEMS",
    "MAX_ITEM_BYTES",
    "CaptureBatch",
    "CaptureItem",
    "CapturePolicy",
    "CaptureReason",
    "CaptureResult",
    "capture_path",
    "item_id",
]

MAX_ITEM_BYTES = 1024 * 1024  # the raw request of one captured item, before base64
MAX_BATCH_ITEMS = 64


class CaptureReason(StrEnum):
    """Why an item was kept."""

    LOW_CONFIDENCE = "low_confidence"
    SMALL_MARGIN = "small_margin"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    SAMPLE = "sample"


class CapturePolicy(BaseModel):
    """When a device keeps a request for labelling; every rule is optional, any one that fires keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_confidence: float | None = Field(default=None, gt=0, le=1, description="keep when top-1 probability < this")
    min_margin: float | None = Field(default=None, gt=0, le=1, description="keep when top-1 minus top-2 < this")
    max_ood_score: float | None = Field(
        default=None, gt=0, description="keep when the distance to the training centroid, in training spreads, > this"
    )
    sample_rate: float = Field(default=0.0, ge=0, le=1, description="keep this fraction of all requests")
    daily_cap: int = Field(default=1000, ge=1, le=1_000_000, description="items kept per device and UTC day")
    disk_budget_mb: float = Field(default=64.0, gt=0, le=100_000, description="spool size; oldest dropped first")

    @model_validator(mode="after")
    def _some_rule(self) -> CapturePolicy:
        rules = (self.min_confidence, self.min_margin, self.max_ood_score)
        if self.enabled and all(r is None for r in rules) and self.sample_rate == 0:
            raise ValueError("an enabled policy needs min_confidence, min_margin, max_ood_score or sample_rate")
        return self


class CaptureItem(BaseModel):
    """One captured request: the raw input as received, what the model answered, and why it was kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of content + model + version")
    model: Id
    version: Version
    reason: CaptureReason
    content_type: str = Field(default="application/json", max_length=128)
    content_b64: str = Field(max_length=(MAX_ITEM_BYTES * 4) // 3 + 4)
    outputs: dict[str, Any] = Field(default_factory=dict, description="top classes and scores, OOD score")
    captured_at: datetime


class CaptureBatch(BaseModel):
    """What a device uploads at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: Id
    items: list[CaptureItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class CaptureResult(BaseModel):
    """The hub's answer: stored, already there, or refused with a reason (never retried)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stored: list[str] = Field(default_factory=list)
    duplicates: list[str] = Field(default_factory=list)
    refused: dict[str, str] = Field(default_factory=dict)


def item_id(content: bytes | bytearray, model: str, version: str) -> str:
    """Return the content address of a captured item."""
    digest = hashlib.sha256(content)
    digest.update(b"\0" + model.encode() + b"\0" + version.encode())
    return digest.hexdigest()


def capture_path(device_id: str) -> str:
    """Return the hub path a device posts its captured items to."""
    return f"/devices/{device_id}/captures"
