"""Fixtures that start real things: a mosquitto broker, a PostgreSQL schema, a state dir."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Broker

PG_DSN = os.environ.get("AUTODL_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


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
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {PG_DSN}: {exc}")
    schema = f"autodl_test_{uuid.uuid4().hex[:12]}"
    params = dict(item.split("=", 1) for item in PG_DSN.split())
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield (
                f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
                f"{params.get('port', '5432')}/{params.get('dbname', 'test')}?options=-csearch_path%3D{schema}"
            )
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def tmp_state_dir(tmp_path: Path) -> Path:
    """An empty, private state directory for an agent or a hub."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path
