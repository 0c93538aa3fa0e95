"""Fixtures that start real things: a mosquitto broker, a PostgreSQL schema, a state dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.postgres import pg_schema_url
from tests.support.processes import Broker


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
