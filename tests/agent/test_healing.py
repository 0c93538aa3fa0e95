"""Health-window verdicts and the watchdog, on real Telemetry accounting."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.config import AgentSettings
from agent.healing import HealthMonitor, Watchdog
from agent.runtime import LoadedModel
from agent.telemetry import Telemetry


def monitor(tmp_path: Path, **overrides: Any) -> tuple[HealthMonitor, Telemetry, list[tuple[str, str]], list[str]]:
    settings = AgentSettings(
        state_dir=tmp_path, health_window_s=3600, health_min_requests=10, health_latency_ratio=2.0,
        health_latency_min_ms=5.0, health_error_delta=0.05, **overrides,
    )  # fmt: skip
    telemetry = Telemetry(tmp_path)
    rollbacks: list[tuple[str, str]] = []
    commits: list[str] = []
    health = HealthMonitor(
        settings, telemetry, lambda n, why: rollbacks.append((n, why)), lambda n, v: commits.append(v)
    )
    return health, telemetry, rollbacks, commits


def traffic(telemetry: Telemetry, version: str, n: int, ms: float, errors: int = 0) -> None:
    for i in range(n):
        telemetry.observe("m", version, ms / 1000, ok=i >= errors)


@pytest.mark.parametrize(
    ("new_ms", "new_errors", "verdict"),
    [
        (1.2, 0, None),  # as fast: fine
        (8.0, 0, "p95 latency"),  # 8x slower and 7 ms more: roll back
        (1.9, 0, None),  # under 2x: fine
        (1.0, 3, "error rate"),  # 10% errors vs 0%: roll back
    ],
)
def test_verdicts(tmp_path: Path, new_ms: float, new_errors: int, verdict: str | None) -> None:
    health, telemetry, rollbacks, commits = monitor(tmp_path)
    traffic(telemetry, "1", 50, 1.0)
    health.activated("m", "2", "1")
    traffic(telemetry, "2", 9, new_ms * 100)  # below min_requests: no verdict yet
    health.check()
    assert rollbacks == [] and commits == []
    telemetry.reset_version("m", "2")
    traffic(telemetry, "2", 30, new_ms, errors=new_errors)
    health.check()
    if verdict is None:
        assert rollbacks == [] and health.open_windows() == {"m": "2"}
    else:
        assert len(rollbacks) == 1 and verdict in rollbacks[0][1] and health.open_windows() == {}


def test_a_clean_window_commits(tmp_path: Path) -> None:
    health, telemetry, rollbacks, commits = monitor(
        tmp_path,
    )
    health.settings.health_window_s = 0
    traffic(telemetry, "1", 50, 1.0)
    health.activated("m", "2", "1")
    traffic(telemetry, "2", 20, 1.0)
    health.check()
    assert commits == ["2"] and rollbacks == []


def test_the_watchdog_reloads_a_crashing_and_a_stuck_model(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path, watchdog_errors=3, watchdog_stuck_s=0.01)
    reloaded: list[str] = []
    telemetry = Telemetry(tmp_path)
    dog = Watchdog(settings, telemetry, reloaded.append)
    model = cast(LoadedModel, SimpleNamespace(name="m", version="1"))
    for _ in range(3):
        with pytest.raises(RuntimeError), dog.request(model):
            raise RuntimeError("ORT failed")
    dog.check()
    assert reloaded == ["m"]
    assert telemetry.version_stats("m", "1").errors == 3
    with dog.request(model):
        time.sleep(0.05)
        dog.check()  # a request in flight past watchdog_stuck_s
        dog.check()  # the same stuck request reloads once
    assert reloaded == ["m", "m"] and dog.reloads == 2
