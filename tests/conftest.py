"""Fixtures that start real things: a mosquitto broker, a PostgreSQL schema, a state dir."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.fleet import Fleet
from tests.support.postgres import pg_schema_url
from tests.support.processes import Broker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    """A failing test that used a Fleet gets every process's log in its report.

    A fleet shared by a module or package outlives the test, so its own ``__exit__`` cannot
    print them at the failure.
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and call.when == "call":
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Fleet):
                report.sections.append((f"{name}: process logs", value.logs()))


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto of this test's own on a free loopback port; stop()/start() simulate an outage."""
    broker = Broker(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL to the local PostgreSQL, in a fresh schema for this test session."""
    yield from pg_schema_url()


@pytest.fixture
def tmp_state_dir(tmp_path: Path) -> Path:
    """An empty, private state directory for an agent or a hub."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path
