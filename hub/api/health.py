"""Health: liveness, readiness (database and broker), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from hub.api.deps import Viewer
from hub.db import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Answer while the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready"}})
def readyz(request: Request, session: SessionDep) -> JSONResponse:
    """Answer 200 when the database (and the broker, if used) are reachable."""
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready", with the reason shown
        checks["database"] = f"error: {exc.__class__.__name__}"
    messaging = request.app.state.messaging
    if messaging is not None:
        connected = getattr(messaging, "connected", None)
        connected = connected() if callable(connected) else connected
        checks["mqtt"] = "ok" if connected in (True, None) else "disconnected"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


def _metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


public_metrics = APIRouter(tags=["health"])
private_metrics = APIRouter(tags=["health"])


@public_metrics.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus exposition, open to scrapers (`metrics_public`, the default)."""
    return _metrics(request)


@private_metrics.get("/metrics", response_class=Response)
def metrics_for_viewers(request: Request, _caller: Viewer) -> Response:
    """Prometheus exposition for viewer keys (when `metrics_public` is off)."""
    return _metrics(request)
