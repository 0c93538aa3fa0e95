"""Fixtures for the hub: the real app on SQLite and on PostgreSQL, keys, manifests, a hub process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub import HubProcess
from tests.support.hub_app import Hub, make_hub
from tests.support.postgres import pg_schema_url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, then a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.db'}"
    else:
        yield from pg_schema_url()


@pytest.fixture
def hub(tmp_path: Path, database_url: str) -> Iterator[Hub]:
    """The hub app on SQLite and on PostgreSQL."""
    yield from make_hub(tmp_path, database_url)


@pytest.fixture
def sqlite_hub(tmp_path: Path) -> Iterator[Hub]:
    """The hub app on SQLite only (for tests whose subject is not the database)."""
    yield from make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")


@pytest.fixture
def hub_process(tmp_path: Path) -> Iterator[HubProcess]:
    """A real `autodl-hub serve` with its embedded mosquitto, on free ports."""
    with HubProcess(tmp_path / "hub") as process:
        yield process
