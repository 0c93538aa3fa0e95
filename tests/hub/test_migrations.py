"""The schema is created by migrations, and upgrading keeps the data."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import Session, SQLModel

from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.models import ApiKey, Device, ModelVersion, Role
from hub.security import authenticate, hash_secret
from tests.support.postgres import pg_schema_url


def test_upgrade_from_the_first_revision_keeps_data(database_url: str, tmp_path: Path) -> None:
    engine = create_engine_for(HubSettings(data_dir=tmp_path, database_url=database_url))
    migrate(engine, "0001")
    now = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    secret = "adk_from-an-old-hub"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_key (name, key_hash, role, revoked, created_by, created_at)"
                " VALUES ('old', :h, 'admin', false, 'test', :now)"
            ),
            {"h": hash_secret(secret), "now": now},
        )
        conn.execute(
            text(
                "INSERT INTO device (id, name, labels, profile, agent_version, online, decommissioned, created_at)"
                " VALUES ('dev-1', 'cam', '{\"site\": \"a\"}', '{}', '0.1', false, false, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO model (name, task, description, created_at) VALUES ('digits', 'classification', '', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO model_version (model_id, version, status, task, manifest, signed_manifest,"
                " manifest_sha256, metrics, lineage, published_by, created_at)"
                " VALUES (1, '1.0.0', 'active', 'classification', '{}', '{}', :sha, '{}', '{}', 'test', :now)"
            ),
            {"sha": "0" * 64, "now": now},
        )

    migrate(engine)

    with Session(engine) as session:
        principal = authenticate(session, secret)
        assert principal.role == Role.ADMIN and principal.rate_limit is None
        device = session.get(Device, "dev-1")
        assert device is not None and device.labels == {"site": "a"}
        assert device.created_at == datetime(2026, 1, 1, tzinfo=UTC)
        assert session.get(ModelVersion, 1) is not None
        key = session.get(ApiKey, 1)
        assert key is not None and key.name == "old"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    engine.dispose()


def test_migrating_twice_is_harmless(tmp_path: Path) -> None:
    engine = create_engine_for(HubSettings(data_dir=tmp_path))
    migrate(engine)
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


_MIGRATE = (
    "import sys; from hub.config import HubSettings; from hub.db import create_engine_for, migrate; "
    "migrate(create_engine_for(HubSettings(data_dir=sys.argv[1], database_url=sys.argv[2])))"
)


def test_replicas_migrating_postgresql_at_once_all_succeed(tmp_path: Path) -> None:
    urls = pg_schema_url()
    url = next(urls)
    try:
        replicas = [
            subprocess.Popen([sys.executable, "-c", _MIGRATE, str(tmp_path), url], stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        errors = [proc.communicate(timeout=120)[1].decode() for proc in replicas]
        assert [proc.returncode for proc in replicas] == [0, 0, 0], errors
        engine = create_engine_for(HubSettings(data_dir=tmp_path, database_url=url))
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
        engine.dispose()
    finally:
        urls.close()
