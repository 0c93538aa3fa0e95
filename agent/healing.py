"""Self-healing: a watchdog that reloads stuck or crashing sessions, and the post-activation health window.

After each activation the new version is watched for `health_window_s`. Its error rate
and p95 latency are compared with the previous version's (its recent requests before
the swap); past `health_latency_ratio` (and `health_latency_min_ms`) or
`health_error_delta` it is rolled back at once, with the reason journaled and reported.
A clean window ends in state `committed`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.config import AgentSettings
from agent.errors import AgentError
from agent.runtime import LoadedModel
from agent.telemetry import Telemetry, VersionStats
from agent.tensors import InvalidInputError
from agent.updates import Updater
from shared.messages import UpdateState

__all__ = ["HealingError", "HealthMonitor", "Watchdog", "reload", "rollback"]

logger = logging.getLogger(__name__)


class HealingError(AgentError):
    """A rollback or reload that cannot be done (nothing to go back to, nothing loaded)."""


def rollback(updater: Updater, name: str, reason: str) -> str:
    """Serve the previous version of `name` again; mark the current one failed; return the version served."""
    record = updater.store.model(name)
    if record.active is None or record.previous is None:
        raise HealingError(f"{name}: no previous version to roll back to")
    bad, good = record.active, record.previous
    model = updater.load_verified(good)
    updater.registry.activate(model)
    updater.save(
        record.with_(
            state=UpdateState.ROLLED_BACK,
            active=good,
            previous=None,
            error=f"rolled back from {bad.version}: {reason}",
            failed=f"{bad.version}@{bad.manifest_url}",  # the desired state does not bring it back
        ),
        f"rolled back from {bad.version}: {reason}",
    )
    logger.warning("%s: rolled back from %s to %s: %s", name, bad.version, good.version, reason)
    return good.version


def reload(updater: Updater, name: str) -> str:
    """Load the active version of `name` into a fresh session and swap it in; return the version."""
    record = updater.store.model(name)
    if record.active is None:
        raise HealingError(f"{name}: no active version to reload")
    updater.registry.activate(updater.load_verified(record.active))
    return record.active.version


class Watchdog:
    """Times every request; reloads a model whose requests hang or keep failing."""

    def __init__(self, settings: AgentSettings, telemetry: Telemetry, reloader: Callable[[str], object]) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.reloader = reloader
        self.reloads = 0
        self._lock = threading.Lock()
        self._inflight: dict[int, tuple[str, str, float]] = {}
        self._failures: dict[str, int] = {}
        self._handled: set[int] = set()
        self._next = 0

    @contextmanager
    def request(self, model: LoadedModel) -> Iterator[None]:
        """Account one request on `model` (a bad input is the client's fault, not the model's)."""
        start = time.monotonic()
        with self._lock:
            self._next += 1
            token = self._next
            self._inflight[token] = (model.name, model.version, start)
        ok = False
        try:
            yield
            ok = True
        except InvalidInputError:
            ok = True
            raise
        finally:
            with self._lock:
                self._inflight.pop(token, None)
                self._handled.discard(token)
                self._failures[model.name] = 0 if ok else self._failures.get(model.name, 0) + 1
            self.telemetry.observe(model.name, model.version, time.monotonic() - start, ok)

    def check(self) -> None:
        """Reload models with a request stuck past `watchdog_stuck_s` or too many failures in a row."""
        now = time.monotonic()
        due: set[str] = set()
        with self._lock:
            for token, (name, _version, start) in self._inflight.items():
                if now - start > self.settings.watchdog_stuck_s and token not in self._handled:
                    self._handled.add(token)
                    due.add(name)
            for name, failures in self._failures.items():
                if failures >= self.settings.watchdog_errors:
                    self._failures[name] = 0
                    due.add(name)
        for name in sorted(due):
            try:
                self.reloader(name)
                self.reloads += 1
                logger.warning("%s: session stuck or failing; reloaded", name)
            except AgentError as exc:
                logger.error("%s: watchdog reload failed: %s", name, exc)


@dataclass(frozen=True)
class _Window:
    version: str
    previous: str | None
    started: float
    baseline: VersionStats


class HealthMonitor:
    """Watches each newly activated version; rolls it back or commits it."""

    def __init__(
        self,
        settings: AgentSettings,
        telemetry: Telemetry,
        on_rollback: Callable[[str, str], object],
        on_commit: Callable[[str, str], object],
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.on_rollback = on_rollback
        self.on_commit = on_commit
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def activated(self, name: str, version: str, previous: str | None) -> None:
        """Open the health window of a version that just became active."""
        baseline = self.telemetry.version_stats(name, previous) if previous else VersionStats(0, 0, 0.0)
        self.telemetry.reset_version(name, version)
        with self._lock:
            self._windows[name] = _Window(version, previous, time.monotonic(), baseline)
        logger.info("%s %s: health window of %.0fs opened", name, version, self.settings.health_window_s)

    def open_windows(self) -> dict[str, str]:
        """Return model -> version still being watched."""
        with self._lock:
            return {name: w.version for name, w in self._windows.items()}

    def verdict(self, window: _Window, stats: VersionStats) -> str | None:
        """Return why `stats` is worse than the window's baseline, or None."""
        s = self.settings
        if stats.requests < s.health_min_requests:
            return None
        base = window.baseline
        if stats.error_rate > base.error_rate + s.health_error_delta:
            return (
                f"error rate {stats.error_rate:.1%} over {stats.requests} requests vs {base.error_rate:.1%}"
                f" of {window.previous or 'nothing'} (threshold +{s.health_error_delta:.1%})"
            )
        if base.requests >= s.health_min_requests and base.p95_ms > 0:
            limit = max(base.p95_ms * s.health_latency_ratio, base.p95_ms + s.health_latency_min_ms)
            if stats.p95_ms > limit:
                return (
                    f"p95 latency {stats.p95_ms:.1f} ms vs {base.p95_ms:.1f} ms of {window.previous}"
                    f" (limit {limit:.1f} ms)"
                )
        return None

    def check(self) -> None:
        """Judge every open window once."""
        with self._lock:
            windows = dict(self._windows)
        for name, window in windows.items():
            reason = self.verdict(window, self.telemetry.version_stats(name, window.version))
            expired = time.monotonic() - window.started >= self.settings.health_window_s
            if reason is None and not expired:
                continue
            with self._lock:
                if self._windows.get(name) is not window:
                    continue  # replaced by a newer activation meanwhile
                del self._windows[name]
            try:
                if reason is not None and window.previous is not None:
                    self.on_rollback(name, f"health window: {reason}")
                elif reason is None:
                    stats = self.telemetry.version_stats(name, window.version)
                    if stats.requests < self.settings.health_min_requests:
                        logger.info(
                            "%s %s: %d requests in the window, too few to judge", name, window.version, stats.requests
                        )
                    self.on_commit(name, window.version)
                else:
                    logger.warning("%s %s is unhealthy (%s) with nothing to roll back to", name, window.version, reason)
            except AgentError as exc:
                logger.error("%s: health verdict could not be applied: %s", name, exc)
