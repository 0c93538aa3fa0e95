"""The database engine and sessions: SQLite in WAL mode by default, PostgreSQL at scale.

The schema is owned by the Alembic migrations in `hub.migrations`; `migrate()` brings any
database to the newest revision, so upgrading a hub keeps its data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from hub.config import HubSettings

__all__ = [
    "SessionDep",
    "SessionFactory",
    "create_engine_for",
    "get_session",
    "migrate",
    "migration_config",
    "session_factory",
]

logger = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

_MIGRATION_LOCK = 0x6175746F646C  # "autodl": the PostgreSQL advisory lock held while migrating


def create_engine_for(settings: HubSettings) -> Engine:
    """Create the engine for the settings' database URL."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the MQTT ingest writes; busy_timeout waits out the
    # single writer lock instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def session_factory(engine: Engine) -> SessionFactory:
    """Return a callable that opens a new session on `engine`."""

    def open_session() -> Session:
        return Session(engine, expire_on_commit=False)

    return open_session


def migration_config(engine: Engine) -> Any:
    """Return an Alembic Config for the migrations shipped in this package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision` (the newest by default)."""
    from alembic import command

    logger.info("migrating database %s to %s", engine.url.render_as_string(hide_password=True), revision)
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as lock:
        if postgres:
            # Hub replicas starting together must not run the same migration twice.
            lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
        try:
            command.upgrade(migration_config(engine), revision)
        finally:
            if postgres:
                lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})


def get_session(request: Request) -> Iterator[Session]:
    """Yield a session from the app's factory (a FastAPI dependency)."""
    factory: SessionFactory = request.app.state.session_factory
    with factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
