"""Serving and device telemetry: per-interval points for the outbox, `/metrics` text for Prometheus.

Per model version: `requests`, `errors`, `latency_p50_ms`, `latency_p95_ms`,
`latency_p99_ms` and `throughput_rps` per interval, labelled model/version (the names
`shared.metrics` promises the hub's rollout analysis); for text generation also time to
first token, decode tokens/s and tokens in and out, and bad requests by code. Per device: CPU, memory, disk,
process RSS, temperature where /sys exposes it, GPU through NVML where present. The
Prometheus text format is written here directly: the agent does not carry a client library.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import metrics

__all__ = ["Family", "Point", "Telemetry", "VersionStats", "device_points", "percentile"]

Point = tuple[str, float, dict[str, str]]  # name, value, labels
# One Prometheus metric family: name (after `autodl_agent_`), type, help, samples (labels, value).
Family = tuple[str, str, str, list[tuple[dict[str, str], float]]]

PREFIX = "autodl_agent_"
# Device points under Prometheus names (base units: ratios, not percent; _celsius): telemetry
# to the hub keeps the point names the dashboard reads, /metrics follows the conventions.
_DEVICE_FAMILIES: dict[str, tuple[str, float, str]] = {
    "cpu_percent": ("cpu_usage_ratio", 0.01, "Busy share of all CPUs between two scrapes"),
    "memory_used_bytes": ("memory_used_bytes", 1.0, "Memory in use on the device (total - available)"),
    "memory_percent": ("memory_used_ratio", 0.01, "Share of the device's memory in use"),
    "process_rss_bytes": ("process_resident_memory_bytes", 1.0, "Resident memory of the agent process"),
    "disk_free_bytes": ("disk_free_bytes", 1.0, "Free space on the state directory's file system"),
    "disk_used_percent": ("disk_used_ratio", 0.01, "Share of the state directory's file system in use"),
    "temperature_c": ("temperature_celsius", 1.0, "Thermal zone temperature"),
    "gpu_utilization_percent": ("gpu_utilization_ratio", 0.01, "GPU busy share (NVML)"),
    "gpu_memory_used_bytes": ("gpu_memory_used_bytes", 1.0, "GPU memory in use (NVML)"),
}

# Histogram buckets of request latency (seconds) on /metrics.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_RECENT = 2048  # latencies kept per version for the health window's comparison


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class VersionStats:
    """Requests, errors and latency of one model version since it was last reset."""

    requests: int
    errors: int
    p95_ms: float

    @property
    def error_rate(self) -> float:
        """Return errors per request (0 with no requests)."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class _Generation:
    interval_ttft: list[float] = field(default_factory=list)
    interval_tps: list[float] = field(default_factory=list)
    interval_in: int = 0
    interval_out: int = 0
    total_in: int = 0
    total_out: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    last_tps: float = 0.0


@dataclass
class _Serving:
    interval_latencies: list[float] = field(default_factory=list)
    interval_requests: int = 0
    interval_errors: int = 0
    total_requests: int = 0
    total_errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    since_requests: int = 0
    since_errors: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))
    interval_queue: list[float] = field(default_factory=list)
    interval_compute: list[float] = field(default_factory=list)
    interval_rows: int = 0
    queue_sum: float = 0.0
    queue_count: int = 0
    compute_sum: float = 0.0
    batches: int = 0
    batch_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_BUCKETS))
    rows_total: int = 0


class Telemetry:
    """Thread-safe request accounting; `collect()` turns one interval into points."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._serving: dict[tuple[str, str], _Serving] = {}
        self._generation: dict[tuple[str, str], _Generation] = {}
        self._bad_requests: dict[tuple[str, str], int] = {}
        self._interval_start = time.monotonic()
        self._cpu = _CpuSampler()
        self._refused: dict[str, int] = {}

    def refused(self, reason: str) -> None:
        """Count a request refused (bad input, over a limit, timed out) by reason."""
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def _of(self, model: str, version: str) -> _Serving:
        """Return a version's counters, made on first use; call with the lock held."""
        s = self._serving.get((model, version))
        if s is None:  # not setdefault: that would build a _Serving (lists, a deque) on every request
            s = self._serving[(model, version)] = _Serving()
        return s

    def observe_batch(self, model: str, version: str, rows: int, waited: list[float], compute: float) -> None:
        """Account one `session.run`: its rows, each request's time in the queue, its duration."""
        with self._lock:
            s = self._of(model, version)
            s.interval_queue += waited
            s.interval_compute.append(compute)
            s.interval_rows += rows
            s.queue_sum += sum(waited)
            s.queue_count += len(waited)
            s.compute_sum += compute
            s.batches += 1
            s.rows_total += rows
            if (i := bisect_left(BATCH_BUCKETS, rows)) < len(BATCH_BUCKETS):
                s.batch_buckets[i] += 1

    def observe(self, model: str, version: str, seconds: float, ok: bool) -> None:
        """Account one inference request."""
        with self._lock:
            s = self._of(model, version)
            s.interval_requests += 1
            s.total_requests += 1
            s.since_requests += 1
            s.latency_sum += seconds
            s.interval_latencies.append(seconds)
            s.recent.append(seconds)
            if not ok:
                s.interval_errors += 1
                s.total_errors += 1
                s.since_errors += 1
            if (i := bisect_left(BUCKETS, seconds)) < len(BUCKETS):
                s.buckets[i] += 1

    def observe_generation(
        self,
        model: str,
        version: str,
        seconds: float,
        ok: bool,
        ttft_s: float | None,
        decode_tps: float | None,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        """Account one generation request; its latency is its time to first token (see shared.metrics)."""
        self.observe(model, version, ttft_s if ttft_s is not None else seconds, ok)
        with self._lock:
            g = self._generation.setdefault((model, version), _Generation())
            g.interval_in += tokens_in
            g.interval_out += tokens_out
            g.total_in += tokens_in
            g.total_out += tokens_out
            if ttft_s is not None:
                g.interval_ttft.append(ttft_s)
                g.ttft_sum += ttft_s
                g.ttft_count += 1
            if decode_tps is not None:
                g.interval_tps.append(decode_tps)
                g.last_tps = decode_tps

    def bad_request(self, model: str, code: str) -> None:
        """Count a refused text-generation request (400), by model name as asked and error code."""
        with self._lock:
            key = (model[:128], code)
            self._bad_requests[key] = self._bad_requests.get(key, 0) + 1

    def reset_version(self, model: str, version: str) -> None:
        """Start counting a version afresh (it was just activated)."""
        with self._lock:
            s = self._of(model, version)
            s.since_requests = s.since_errors = 0
            s.recent.clear()

    def version_stats(self, model: str, version: str) -> VersionStats:
        """Return a version's requests and errors since its reset and its recent p95."""
        with self._lock:
            s = self._serving.get((model, version))
            if s is None:
                return VersionStats(0, 0, 0.0)
            return VersionStats(s.since_requests, s.since_errors, percentile(list(s.recent), 95) * 1000)

    def collect(self) -> list[Point]:
        """Return this interval's serving and device points and start a new interval."""
        now = time.monotonic()
        with self._lock:
            elapsed = max(now - self._interval_start, 1e-9)
            self._interval_start = now
            points: list[Point] = []
            for (model, version), s in self._serving.items():
                if not s.interval_requests:
                    continue
                labels = metrics.serving_labels(model, version)
                ms = [v * 1000 for v in s.interval_latencies]
                points += [
                    (metrics.REQUESTS, float(s.interval_requests), labels),
                    (metrics.ERRORS, float(s.interval_errors), labels),
                    ("latency_p50_ms", percentile(ms, 50), labels),
                    (metrics.LATENCY_P95_MS, percentile(ms, 95), labels),
                    ("latency_p99_ms", percentile(ms, 99), labels),
                    ("throughput_rps", s.interval_requests / elapsed, labels),
                ]
                if s.interval_compute:
                    queue = [v * 1000 for v in s.interval_queue]
                    compute = [v * 1000 for v in s.interval_compute]
                    points += [
                        (metrics.QUEUE_P50_MS, percentile(queue, 50), labels),
                        (metrics.QUEUE_P95_MS, percentile(queue, 95), labels),
                        (metrics.COMPUTE_P50_MS, percentile(compute, 50), labels),
                        (metrics.COMPUTE_P95_MS, percentile(compute, 95), labels),
                        (metrics.BATCHES, float(len(compute)), labels),
                        (metrics.BATCH_SIZE_MEAN, s.interval_rows / len(compute), labels),
                    ]
                s.interval_latencies, s.interval_requests, s.interval_errors = [], 0, 0
                s.interval_queue, s.interval_compute, s.interval_rows = [], [], 0
            points += self._generation_points()
        return points + device_points(self.state_dir, self._cpu)

    def _generation_points(self) -> list[Point]:
        points: list[Point] = []
        for (model, version), g in self._generation.items():
            if not (g.interval_in or g.interval_ttft):
                continue
            labels = metrics.serving_labels(model, version)
            points += [
                (metrics.TOKENS_IN, float(g.interval_in), labels),
                (metrics.TOKENS_OUT, float(g.interval_out), labels),
            ]
            if g.interval_ttft:
                ms = [v * 1000 for v in g.interval_ttft]
                points += [
                    ("ttft_p50_ms", percentile(ms, 50), labels),
                    (metrics.TTFT_P95_MS, percentile(ms, 95), labels),
                ]
            if g.interval_tps:
                points.append((metrics.DECODE_TPS, percentile(g.interval_tps, 50), labels))
            g.interval_ttft, g.interval_tps, g.interval_in, g.interval_out = [], [], 0, 0
        return points

    def _generation_families(self) -> list[Family]:
        with self._lock:
            gen = {
                k: (g.total_in, g.total_out, g.ttft_sum, g.ttft_count, g.last_tps) for k, g in self._generation.items()
            }
            bad = dict(self._bad_requests)
        ordered = sorted(gen.items())
        return [
            (
                "generation_prompt_tokens_total",
                "counter",
                "Prompt tokens of text-generation requests",
                [(_key(k), v[0]) for k, v in ordered],
            ),
            (
                "generation_completion_tokens_total",
                "counter",
                "Tokens generated",
                [(_key(k), v[1]) for k, v in ordered],
            ),
            (
                "generation_ttft_seconds_total",
                "counter",
                "Sum of times to first token",
                [(_key(k), v[2]) for k, v in ordered],
            ),
            (
                "generation_first_tokens_total",
                "counter",
                "Generations that produced a first token",
                [(_key(k), v[3]) for k, v in ordered],
            ),
            (
                "generation_decode_tokens_per_second",
                "gauge",
                "Decode speed of the latest generation",
                [(_key(k), v[4]) for k, v in ordered],
            ),
            (
                "generation_bad_requests_total",
                "counter",
                "Text-generation requests refused as invalid",
                [({"model": m, "code": c}, float(n)) for (m, c), n in sorted(bad.items())],
            ),
        ]

    def prometheus(self, families: list[Family]) -> str:
        """Return the cumulative serving metrics, `families` and the device's in the text format."""
        with self._lock:
            serving = {
                key: (s.total_requests, s.total_errors, s.latency_sum, list(s.buckets))
                for key, s in self._serving.items()
            }
            runs = {
                key: (s.queue_sum, s.queue_count, s.compute_sum, s.batches, list(s.batch_buckets), s.rows_total)
                for key, s in self._serving.items()
                if s.batches
            }
            refused = dict(self._refused)
        ordered = sorted(serving.items())
        timed = sorted(runs.items())
        out: list[Family] = [
            ("requests_total", "counter", "Inference requests served", [(_key(k), v[0]) for k, v in ordered]),
            (
                "request_errors_total",
                "counter",
                "Inference requests that failed",
                [(_key(k), v[1]) for k, v in ordered],
            ),
            (
                "queue_seconds_total",
                "counter",
                "Time requests waited for their run",
                [(_key(k), v[0]) for k, v in timed],
            ),
            ("queued_requests_total", "counter", "Requests that waited for a run", [(_key(k), v[1]) for k, v in timed]),
            ("compute_seconds_total", "counter", "Time of session runs", [(_key(k), v[2]) for k, v in timed]),
            (
                "http_refused_total",
                "counter",
                "Requests refused, by reason",
                [({"reason": r}, float(n)) for r, n in sorted(refused.items())],
            ),
        ]
        lines = _text(out)
        name = PREFIX + "request_duration_seconds"
        lines += [f"# HELP {name} Inference request latency.", f"# TYPE {name} histogram"]
        for key, (count, _, total, buckets) in ordered:
            running = 0
            for bound, n in zip(BUCKETS, buckets, strict=True):
                running += n
                lines.append(f"{name}_bucket{_labels(key, le=str(bound))} {running}")
            lines.append(f"{name}_bucket{_labels(key, le='+Inf')} {count}")
            lines.append(f"{name}_sum{_labels(key)} {total}")
            lines.append(f"{name}_count{_labels(key)} {count}")
        name = PREFIX + "batch_size"
        lines += [f"# HELP {name} Rows per session run.", f"# TYPE {name} histogram"]
        for key, (_q, _n, _c, batches, buckets, rows) in timed:
            running = 0
            for bound, n in zip(BATCH_BUCKETS, buckets, strict=True):
                running += n
                lines.append(f"{name}_bucket{_labels(key, le=str(bound))} {running}")
            lines.append(f"{name}_bucket{_labels(key, le='+Inf')} {batches}")
            lines += [f"{name}_sum{_labels(key)} {rows}", f"{name}_count{_labels(key)} {batches}"]
        device: dict[str, Family] = {}
        for point, value, labels in device_points(self.state_dir, None):
            if point in _DEVICE_FAMILIES:
                metric, scale, text = _DEVICE_FAMILIES[point]
                device.setdefault(metric, (metric, "gauge", text, []))[3].append((labels, value * scale))
        lines += _text(families + self._generation_families() + list(device.values()))
        return "\n".join(lines) + "\n"


def _text(families: list[Family]) -> list[str]:
    lines: list[str] = []
    for name, kind, text, samples in families:
        full = PREFIX + name
        lines += [f"# HELP {full} {text}.", f"# TYPE {full} {kind}"]
        lines += [f"{full}{_label_text(labels)} {value}" for labels, value in samples]
    return lines


def _key(key: tuple[str, str]) -> dict[str, str]:
    return metrics.serving_labels(*key)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _label_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _labels(key: tuple[str, str], **extra: str) -> str:
    return _label_text({**metrics.serving_labels(*key), **extra})


class _CpuSampler:
    """CPU busy percent between two reads of /proc/stat."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def percent(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] == last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        return 100.0 * (total - idle) / total


def device_points(state_dir: Path, cpu: _CpuSampler | None) -> list[Point]:
    """Return what can be read of CPU, memory, disk, temperature and GPU on this machine."""
    points: list[Point] = []
    if cpu is not None and (busy := cpu.percent()) is not None:
        points.append(("cpu_percent", busy, {}))
    meminfo = _meminfo()
    if "MemTotal" in meminfo and "MemAvailable" in meminfo:
        used = meminfo["MemTotal"] - meminfo["MemAvailable"]
        points.append(("memory_used_bytes", float(used), {}))
        points.append(("memory_percent", 100.0 * used / max(meminfo["MemTotal"], 1), {}))
    rss = _rss_bytes()
    if rss is not None:
        points.append(("process_rss_bytes", float(rss), {}))
    try:
        disk = shutil.disk_usage(state_dir if state_dir.exists() else state_dir.parent)
        points.append(("disk_free_bytes", float(disk.free), {}))
        points.append(("disk_used_percent", 100.0 * disk.used / max(disk.total, 1), {}))
    except OSError:
        pass
    points += [("temperature_c", value, {"zone": zone}) for zone, value in _temperatures()]
    points += _gpu_points()
    return points


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _temperatures() -> Iterator[tuple[str, float]]:
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip() or zone.name
            yield kind, int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue


_nvml: Any = None
_nvml_state = {"tried": False}


def _gpu_points() -> list[Point]:
    """Return GPU utilisation and memory through NVML; nothing when pynvml or a GPU is absent."""
    global _nvml
    if not _nvml_state["tried"]:
        _nvml_state["tried"] = True
        try:
            import pynvml  # optional: only where NVIDIA GPUs are

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # no library, no driver, no device: no GPU telemetry
            _nvml = None
    if _nvml is None:
        return []
    points: list[Point] = []
    try:
        for i in range(_nvml.nvmlDeviceGetCount()):
            handle = _nvml.nvmlDeviceGetHandleByIndex(i)
            util = _nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = _nvml.nvmlDeviceGetMemoryInfo(handle)
            labels = {"gpu": str(i)}
            points += [
                ("gpu_utilization_percent", float(util.gpu), labels),
                ("gpu_memory_used_bytes", float(mem.used), labels),
            ]
    except Exception:  # a GPU that went away mid-read is skipped this interval
        return points
    return points
