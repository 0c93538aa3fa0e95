"""What an operator asks for when starting a rollout: the model, the devices, the strategy.

`RolloutSpec` is the body of ``POST /rollouts`` and is stored whole on the Rollout row, so
a restarted hub reads back exactly what was asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared import metrics
from shared.topics import validate_id

__all__ = [
    "AnalysisCriteria",
    "RolloutSpec",
    "Selector",
    "Strategy",
]

Version = Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$", max_length=64)]


class Strategy(StrEnum):
    """How devices move to the new version."""

    ALL_AT_ONCE = "all-at-once"
    CANARY = "canary"


class Selector(BaseModel):
    """Which devices a rollout covers: every device, or those with given ids or labels.

    A device matches when `all` is set, when its id is listed, or when it carries every
    label pair of `labels` (ids and labels together select the union).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    all: bool = False
    device_ids: list[str] = Field(default_factory=list, max_length=100_000)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)

    @field_validator("device_ids")
    @classmethod
    def _valid_ids(cls, value: list[str]) -> list[str]:
        for device_id in value:
            validate_id(device_id, "device id")
        return sorted(set(value))

    @model_validator(mode="after")
    def _not_empty(self) -> Selector:
        if self.all and (self.device_ids or self.labels):
            raise ValueError("selector: `all` excludes device_ids and labels")
        if not (self.all or self.device_ids or self.labels):
            raise ValueError("selector: give all=true, device_ids or labels")
        return self

    def matches(self, device_id: str, labels: Mapping[str, str]) -> bool:
        """Return True when the device falls under this selector."""
        if self.all or device_id in self.device_ids:
            return True
        return bool(self.labels) and all(labels.get(k) == v for k, v in self.labels.items())

    def overlaps(self, other: Selector, devices: Iterable[tuple[str, Mapping[str, str]]] = ()) -> bool:
        """Return True when some device could fall under both selectors.

        Label selectors overlap unless they demand different values for one key (a device
        enrolled later could carry both); an id list is checked against `devices`, the
        fleet as it is now.
        """
        if self.all or other.all:
            return True
        if set(self.device_ids) & set(other.device_ids):
            return True
        if self.labels and other.labels:
            shared_keys = self.labels.keys() & other.labels.keys()
            if all(self.labels[k] == other.labels[k] for k in shared_keys):
                return True
        return any(self.matches(d, labels) and other.matches(d, labels) for d, labels in devices)


class AnalysisCriteria(BaseModel):
    """When a step counts as healthy, compared with devices still on the previous version.

    Telemetry is read from points named `requests_metric`, `errors_metric` (counters per
    interval) and `latency_metric` (a p95 in milliseconds), labelled with the model name
    and version (see `shared.metrics`); for text generation also `ttft_metric` (time to
    first token, p95 ms) and `decode_tps_metric` (decode tokens/s), absent for other models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_devices_reporting: int = Field(default=1, ge=0, description="devices of the step that must run the new version")
    max_failed_ratio: float = Field(default=0.0, ge=0, le=1, description="failed updates / settled devices of the step")
    max_error_rate_increase: float | None = Field(
        default=0.05, ge=0, description="allowed rise of errors/requests (absolute, 0.05 = 5 points); None = skip"
    )
    max_latency_increase: float | None = Field(
        default=0.5, ge=0, description="allowed relative rise of p95 latency (0.5 = +50%); None = skip"
    )
    max_ttft_increase: float | None = Field(
        default=0.5, ge=0, description="text generation: allowed relative rise of time to first token; None = skip"
    )
    max_decode_tps_drop: float | None = Field(
        default=0.3, ge=0, le=1, description="text generation: allowed relative drop of decode tokens/s; None = skip"
    )
    min_requests: int = Field(default=1, ge=0, description="requests each side needs before telemetry is compared")
    min_observation_s: float = Field(default=60.0, ge=0, description="time on a step before it may pass")
    update_timeout_s: float = Field(
        default=600.0, gt=0, description="after this, devices still updating no longer hold the step back"
    )
    requests_metric: str = Field(default=metrics.REQUESTS, min_length=1, max_length=128)
    errors_metric: str = Field(default=metrics.ERRORS, min_length=1, max_length=128)
    latency_metric: str = Field(default=metrics.LATENCY_P95_MS, min_length=1, max_length=128)
    ttft_metric: str = Field(default=metrics.TTFT_P95_MS, min_length=1, max_length=128)
    decode_tps_metric: str = Field(default=metrics.DECODE_TPS, min_length=1, max_length=128)


class RolloutSpec(BaseModel):
    """A request to move `model` to `version` on the devices `selector` picks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    version: Version
    selector: Selector = Field(default_factory=lambda: Selector(all=True))
    strategy: Strategy = Strategy.CANARY
    steps: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1, max_length=20)
    step_pause_s: float = Field(default=0.0, ge=0, description="time to hold every step, on top of the analysis")
    require_approval: bool = Field(default=False, description="pause after every passing step until resumed")
    baseline_version: Version | None = Field(
        default=None, description="version for devices outside the canary; default: the most common one deployed"
    )
    analysis: AnalysisCriteria = Field(default_factory=AnalysisCriteria)

    @field_validator("model")
    @classmethod
    def _valid_model(cls, value: str) -> str:
        return validate_id(value, "model name")

    @model_validator(mode="after")
    def _valid_steps(self) -> RolloutSpec:
        if self.strategy is Strategy.ALL_AT_ONCE:
            object.__setattr__(self, "steps", [100.0])
            return self
        steps = self.steps
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError("steps: every percentage must be in (0, 100]")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("steps: percentages must increase")
        if steps[-1] != 100:
            raise ValueError("steps: the last step must be 100")
        return self
