"""A fresh PostgreSQL schema on the local server, for tests that need a real database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["PG_DSN", "pg_schema_url"]

PG_DSN = os.environ.get("AUTODL_TEST_PG_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def pg_schema_url(prefix: str = "autodl_test_") -> Iterator[str]:
    """Yield a SQLAlchemy URL to a new schema, dropped afterwards; skip when no server answers."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL answers at {PG_DSN}: {exc}")
    schema = f"{prefix}{uuid.uuid4().hex[:12]}"
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
