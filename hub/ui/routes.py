"""The dashboard's pages and forms under /ui: fleet, devices, models, rollouts, sign-in.

Handlers stay thin: reads go through the domain modules' queries (`hub.fleet.devices`,
`hub.fleet.commands`, `hub.registry`, `hub.rollouts.queries`, `hub.fleet.telemetry`) and every
change through the same domain functions the REST API calls, with the same roles.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from hub import registry
from hub.api.deps import DeviceIdPath, ModelNamePath
from hub.api.rollouts import _locked, _wake, rollout_detail, rollout_summary
from hub.db import SessionDep
from hub.errors import AuthenticationError, InvalidInputError
from hub.fleet import commands, devices
from hub.rollouts import engine as rollouts
from hub.rollouts.plan import Event
from hub.rollouts.queries import device_history, get_rollout, list_rollouts
from hub.ui import views
from hub.ui.auth import CSRF_FIELD, UiCaller, check_csrf, clear_session, sign_in, start_session
from hub.ui.render import SECURITY_HEADERS, render
from shared.messages import CommandName

__all__ = ["router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

RolloutIdPath = Annotated[str, Path(pattern=r"^ro-[0-9a-f]{1,60}$", max_length=64)]
CsrfForm = Annotated[str, Form(alias=CSRF_FIELD, max_length=128)]  # missing: refused by check_csrf (403)
_ACTIONS = {e.value: e for e in (Event.PAUSE, Event.RESUME, Event.PROMOTE, Event.ABORT)}


def _safe_next(target: str | None) -> str:
    # Only paths inside the dashboard: an open redirect would let a link send users anywhere.
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


def _back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    """Show the sign-in form."""
    return render(request, "login.html", {"next": _safe_next(next), "error": None, "user": None})


@router.post("/login", response_model=None)
def login(
    request: Request,
    session: SessionDep,
    key: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=2048)] = "/ui/",
) -> Response:
    """Check an API key and start a session holding it."""
    try:
        sign_in(session, key)
    except AuthenticationError as exc:
        context = {"next": _safe_next(next), "error": exc.message, "user": None}
        return render(request, "login.html", context, status_code=401)
    response = _back(_safe_next(next))
    start_session(request, response, key)
    return response


@router.post("/logout")
def logout(user: UiCaller, csrf: CsrfForm = "") -> RedirectResponse:
    """End the session."""
    check_csrf(user, csrf)
    response = _back("/ui/login")
    clear_session(response)
    return response


@router.get("", response_class=HTMLResponse)
@router.get("/", response_class=HTMLResponse)
def fleet(request: Request, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """Show the fleet: presence, labels, model versions, update states and every device."""
    rows = devices.list_devices(session, limit=100_000)
    context = {
        "user": user,
        "summary": views.fleet_summary(rows),
        "devices": [(d, views.device_models(d)) for d in rows],
    }
    return render(request, "fleet.html", context)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, device_id: DeviceIdPath, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """Show one device: desired vs reported, history, telemetry charts, commands."""
    device = devices.get_device(session, device_id)
    context = {
        "user": user,
        "device": device,
        "models": views.device_models(device),
        "history": device_history(session, device_id, limit=50),
        "commands": commands.list_commands(session, device_id=device_id, limit=20),
        "command_names": [c.value for c in CommandName],
        "desired_revision": (device.desired or {}).get("revision"),
        "reported_revision": (device.reported or {}).get("revision"),
        "reported_errors": (device.reported or {}).get("errors") or [],
    }
    return render(request, "device.html", context)


@router.get("/api/devices/{device_id}/telemetry")
def device_telemetry(
    device_id: DeviceIdPath,
    session: SessionDep,
    _user: UiCaller,
    minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
) -> JSONResponse:
    """Return a device's recent telemetry grouped into charts."""
    devices.get_device(session, device_id)
    charts = views.telemetry_charts(session, device_id, minutes)
    return JSONResponse({"device_id": device_id, "minutes": minutes, "charts": [c.as_json() for c in charts]})


@router.post("/devices/{device_id}/commands")
def send_command(
    request: Request,
    device_id: DeviceIdPath,
    session: SessionDep,
    user: UiCaller,
    name: Annotated[CommandName, Form()],
    csrf: CsrfForm = "",
    args: Annotated[str, Form(max_length=65536)] = "",
    ttl_s: Annotated[int, Form(ge=1, le=7 * 86400)] = 3600,
) -> RedirectResponse:
    """Send a command to the device (operator)."""
    check_csrf(user, csrf)
    user.require_operator()
    parsed = _json_object(args)
    commands.send_command(
        session,
        name,
        actor=user.principal.actor,
        device_id=device_id,
        args=parsed,
        ttl_s=ttl_s,
        messaging=request.app.state.messaging,
    )
    return _back(f"/ui/devices/{quote(device_id)}#commands")


def _json_object(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"arguments are not JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(value, dict):
        raise InvalidInputError('arguments must be a JSON object, such as {"level": "debug"}')
    return value


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """List models with their versions and aliases."""
    return render(request, "models.html", {"user": user, "models": views.all_models(session)})


@router.get("/models/{name}", response_class=HTMLResponse)
def model_page(request: Request, name: ModelNamePath, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """Show a model: versions, variants per target with gate figures, skipped targets, aliases."""
    model = registry.get_model(session, name)
    context = {
        "user": user,
        "model": model,
        "aliases": registry.aliases(session, model),
        "versions": views.model_versions(session, model),
    }
    return render(request, "model.html", context)


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """List rollouts, newest first."""
    rows = [rollout_summary(session, r) for r in list_rollouts(session, limit=200)]
    return render(request, "rollouts.html", {"user": user, "rollouts": rows})


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(request: Request, rollout_id: RolloutIdPath, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """Show a rollout; its live part refreshes itself from /live."""
    detail = rollout_detail(session, get_rollout(session, rollout_id))
    return render(request, "rollout.html", {"user": user, "r": detail})


@router.get("/rollouts/{rollout_id}/live", response_class=HTMLResponse)
def rollout_live(request: Request, rollout_id: RolloutIdPath, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """Return the live part of a rollout page (progress, analysis, devices, actions, timeline)."""
    detail = rollout_detail(session, get_rollout(session, rollout_id))
    return render(request, "_rollout_live.html", {"user": user, "r": detail})


@router.post("/rollouts/{rollout_id}/{action}")
def rollout_action(
    request: Request,
    rollout_id: RolloutIdPath,
    action: Annotated[str, Path(pattern=r"^(pause|resume|promote|abort)$")],
    session: SessionDep,
    user: UiCaller,
    csrf: CsrfForm = "",
    reason: Annotated[str, Form(max_length=1024)] = "",
) -> RedirectResponse:
    """Pause, resume, promote or abort a rollout (operator)."""
    check_csrf(user, csrf)
    user.require_operator()
    ctx = rollouts.RolloutContext(request.app.state.settings, request.app.state.messaging)
    with _locked(request):
        rollouts.act(session, ctx, rollout_id, _ACTIONS[action], actor=user.principal.actor, reason=reason)
    _wake(request)
    return _back(f"/ui/rollouts/{rollout_id}")
