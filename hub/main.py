"""The app factory: settings, database, routers, error mapping, metrics and request limits."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError

from hub import __version__
from hub.api import (
    artifacts,
    commands,
    datasets,
    devices,
    enroll,
    health,
    jobs,
    keys,
    models,
    rollouts,
    signing_keys,
    telemetry,
    versions,
)
from hub.config import HubSettings
from hub.datasets import CaptureCounters
from hub.db import create_engine_for, migrate, session_factory
from hub.errors import HubError, RateLimitedError
from hub.fleet.retention import install as install_retention
from hub.limits import RequestLimits, capture_authorizer, upload_authorizer
from hub.metrics import HubMetrics, RequestTimer
from hub.rollouts.controller import install as install_rollouts
from hub.security import RateLimiter, load_or_create_signing_key
from hub.ui import install as install_ui
from shared import tracing

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


async def _hub_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


async def _integrity_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.info("conflict: %s", exc)
    return JSONResponse({"detail": "the change conflicts with existing data"}, status_code=409)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Where and why only: FastAPI's default answer repeats the input, which may be megabytes
    # (or a secret) sent by whoever asked.
    errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
    return JSONResponse({"detail": errors[:20]}, status_code=422)


async def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.info("data refused by the database: %s", exc)
    return JSONResponse({"detail": "a value is out of range or not storable"}, status_code=422)


def create_app(
    settings: HubSettings,
    messaging: Any | None = None,
    broker_admin: Any | None = None,
    *,
    engine: Engine | None = None,
    migrate_db: bool = True,
) -> FastAPI:
    """Build the hub's FastAPI app; migrates the database and creates the signing key if missing.

    `messaging` (a `hub.messaging.session.HubMessaging`) publishes desired state, commands and
    releases; `broker_admin` (a `hub.broker.admin.BrokerAdmin`) adds and removes device
    logins. Without them the API still works and stores everything in the database.
    """
    engine = engine or create_engine_for(settings)
    if migrate_db:
        migrate(engine)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    load_or_create_signing_key(settings.signing_key)
    sessions = session_factory(engine)

    app = FastAPI(
        title="autodl hub",
        version=__version__,
        description="Registry, fleet, enrollment, commands and telemetry of autodl.",
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = sessions
    app.state.messaging = messaging
    app.state.broker_admin = broker_admin
    app.state.rate_limiter = RateLimiter()
    app.state.capture_counters = CaptureCounters()
    app.state.metrics = HubMetrics(sessions, lambda: app.state.messaging, app.state.capture_counters.snapshot)

    for module in (
        health,
        enroll,
        keys,
        signing_keys,
        models,
        versions,
        artifacts,
        devices,
        commands,
        telemetry,
        rollouts,
        jobs,
        datasets,
    ):
        app.include_router(module.router)
    app.include_router(health.public_metrics if settings.metrics_public else health.private_metrics)
    install_rollouts(app, settings, sessions, messaging)
    install_retention(app, settings, sessions)

    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DataError, _data_error)
    install_ui(app)  # after the error handlers: /ui answers errors as HTML pages
    app.add_middleware(RequestTimer, metrics=app.state.metrics)
    app.add_middleware(
        RequestLimits,
        max_json_bytes=settings.max_json_bytes,
        max_enroll_bytes=settings.max_enroll_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.body_timeout_s,
        authorize_upload=upload_authorizer(sessions),
        authorize_capture=capture_authorizer(sessions),
    )
    _trace_requests(app)
    return app


def _trace_requests(app: FastAPI) -> None:
    """Give every API request a server span (FastAPI instrumentation) when tracing is on."""
    if not tracing.enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Scrapes and probes would be most of the spans and tell nothing.
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracing.provider(), excluded_urls="/metrics,/healthz,/readyz,/livez,/ui/static"
    )
