"""Per-device telemetry quotas: points and bytes per second, with a burst.

One token bucket per device and dimension, refilled continuously; a batch that does not
fit is refused whole (counted under the ingest reason ``quota``) and never reaches the
database, so one device cannot flood the hub while the others' points keep arriving.
Agents hold the same limits (`AgentSettings.telemetry_max_points_s`, settable by
``set-config``) and send no faster, keeping the rows in their outbox meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TelemetryQuota"]


@dataclass
class _Bucket:
    points: float
    bytes: float
    at: float


class TelemetryQuota:
    """Token buckets per device: `points_per_s` and `bytes_per_s`, each holding `burst_s` seconds' worth."""

    def __init__(
        self,
        points_per_s: float,
        bytes_per_s: float,
        burst_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_devices: int = 1_000_000,
    ) -> None:
        self.points_per_s = points_per_s
        self.bytes_per_s = bytes_per_s
        self.burst_s = burst_s
        self._clock = clock
        self._max_devices = max_devices
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def allow(self, device_id: str, points: int, size: int) -> bool:
        """Take `points` and `size` bytes from the device's buckets; False (nothing taken) if they do not fit."""
        now = self._clock()
        cap_points, cap_bytes = self.points_per_s * self.burst_s, self.bytes_per_s * self.burst_s
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                if len(self._buckets) >= self._max_devices:
                    self._buckets.clear()  # bounded memory; a forgotten device starts with a full bucket
                bucket = self._buckets[device_id] = _Bucket(cap_points, cap_bytes, now)
            elapsed = max(0.0, now - bucket.at)
            bucket.points = min(cap_points, bucket.points + elapsed * self.points_per_s)
            bucket.bytes = min(cap_bytes, bucket.bytes + elapsed * self.bytes_per_s)
            bucket.at = now
            if points > bucket.points or size > bucket.bytes:
                return False
            bucket.points -= points
            bucket.bytes -= size
            return True
