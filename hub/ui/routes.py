"""The dashboard's pages and forms under /ui: fleet, devices, models, training jobs, rollouts, sign-in.

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

from hub import datasets, registry
from hub.api.deps import DeviceIdPath, ModelNamePath
from hub.api.rollouts import _locked, _wake, rollout_detail, rollout_summary
from hub.db import SessionDep
from hub.errors import AuthenticationError, InvalidInputError, PermissionDeniedError
from hub.fleet import commands, devices
from hub.rollouts import engine as rollouts
from hub.rollouts.plan import Event
from hub.rollouts.queries import device_history, get_rollout, list_rollouts
from hub.ui import views
from hub.ui.auth import (
    CSRF_FIELD,
    UiCaller,
    check_csrf,
    check_login_csrf,
    end_session,
    login_csrf,
    set_login_csrf,
    sign_in,
    start_session,
)
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
    """Show the sign-in form (with its CSRF token, also set as a cookie)."""
    return _login_page(request, _safe_next(next), None)


def _login_page(request: Request, next_url: str, error: str | None, status_code: int = 200) -> HTMLResponse:
    token = login_csrf(request)
    context = {"next": next_url, "error": error, "user": None, "login_csrf": token}
    response = render(request, "login.html", context, status_code=status_code)
    set_login_csrf(request, response, token)
    return response


@router.post("/login", response_model=None)
def login(
    request: Request,
    session: SessionDep,
    key: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=2048)] = "/ui/",
    csrf: CsrfForm = "",
) -> Response:
    """Check the form's CSRF token and the API key, then start a server-side session."""
    try:
        check_login_csrf(request, csrf)
        principal = sign_in(session, key)
    except (AuthenticationError, PermissionDeniedError) as exc:
        status = 401 if isinstance(exc, AuthenticationError) else 403
        return _login_page(request, _safe_next(next), exc.message, status)
    response = _back(_safe_next(next))
    start_session(session, request, response, principal)
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, user: UiCaller, csrf: CsrfForm = "") -> RedirectResponse:
    """End the session: the server forgets it, so the cookie is worthless even if kept."""
    check_csrf(user, csrf)
    response = _back("/ui/login")
    end_session(session, request, response)
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


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, user: UiCaller) -> HTMLResponse:
    """List training jobs: queued (and why), running with progress, finished with their version."""
    from hub.training import jobs

    rows = [jobs.snapshot(job) for job in jobs.list_jobs(session, limit=200)]
    return render(request, "jobs.html", {"user": user, "jobs": rows})


@router.get("/datasets/{name}", response_class=HTMLResponse)
def dataset_page(
    request: Request, name: ModelNamePath, session: SessionDep, user: UiCaller, labelled: bool | None = False
) -> HTMLResponse:
    """Label a model's captured items: the input, the model's guess, one button (or digit key) per class."""
    rows, total = datasets.list_items(session, name, labelled=labelled, limit=50)
    settings = request.app.state.settings
    items = [views.capture_preview(row, datasets.item_content(settings, row)) for row in rows]
    classes = views.model_classes(session, name)
    context = {"user": user, "model": name, "items": items, "total": total, "labelled": labelled, "classes": classes}
    return render(request, "dataset.html", context)


@router.post("/datasets/{name}/items/{item_id}/label")
def dataset_label(
    name: ModelNamePath,
    item_id: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
    session: SessionDep,
    user: UiCaller,
    csrf: CsrfForm = "",
    label: Annotated[str, Form(max_length=256)] = "",
) -> RedirectResponse:
    """Label one item (operator) and go back to the next ones."""
    check_csrf(user, csrf)
    user.require_operator()
    datasets.label_item(session, name, item_id, label or None, actor=user.principal.actor)
    return _back(f"/ui/datasets/{quote(name)}")


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
