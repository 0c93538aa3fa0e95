"""The ``autodl-agent`` command line: thin commands over the agent's modules.

Domain errors become exit code 1 with one clear line (credentials: exit code 2).
Heavy modules (onnxruntime, numpy, paho) load inside the commands, not at import.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent import __version__
from agent.errors import AgentError, CredentialsError

app = typer.Typer(help="autodl edge agent: enroll with a hub, run models, report back.", no_args_is_help=True)

StateDir = Annotated[Path | None, typer.Option("--state-dir", help="state directory (env AUTODL_AGENT_STATE_DIR)")]
Port = Annotated[int | None, typer.Option("--port", help="local API port (env AUTODL_AGENT_PORT, default 8500)")]


def _settings(state_dir: Path | None = None, **overrides: Any) -> Any:
    from agent.config import AgentSettings

    values = {k: v for k, v in overrides.items() if v is not None}
    if state_dir is not None:
        values["state_dir"] = state_dir
    return AgentSettings(**values)


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def _api(settings: Any, method: str, path: str, body: Any = None) -> Any:
    import httpx

    from agent.store import Store

    port = settings.port
    if settings.db_path.exists():
        store = Store(settings.db_path)
        port = int(store.get("api_port") or port)
        store.close()
    url = f"http://{settings.host}:{port}{path}"
    try:
        response = httpx.request(method, url, json=body, timeout=60)
    except httpx.HTTPError as exc:
        raise AgentError(f"the agent does not answer at {url} (is `autodl-agent run` running?): {exc}") from exc
    data = response.json()
    if response.status_code >= 400:
        raise AgentError(f"HTTP {response.status_code}: {data.get('error', data)}")
    return data


@app.command()
def version() -> None:
    """Print the agent version."""
    typer.echo(__version__)


@app.command()
def enroll(
    hub: Annotated[str, typer.Option(help="hub URL, e.g. http://hub:8080")],
    token: Annotated[str, typer.Option(help="enrollment token")],
    name: Annotated[str | None, typer.Option(help="device name")] = None,
    label: Annotated[list[str] | None, typer.Option(help="label k=v (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="enroll again even if enrolled")] = False,
    state_dir: StateDir = None,
) -> None:
    """Enroll this device with a hub and store its identity."""
    from agent.enrollment import enroll as do_enroll

    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError(f"label {item!r} is not k=v"))
        labels[key] = value
    settings = _settings(state_dir)
    try:
        identity = do_enroll(settings, hub, token, name, labels, force)
    except AgentError as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"enrolled as {identity.device_id} (hub {identity.hub_url}, mqtt {identity.mqtt_host}:{identity.mqtt_port})"
    )


@app.command()
def run(
    state_dir: StateDir = None,
    port: Port = None,
    host: Annotated[str | None, typer.Option(help="local API bind address")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING")] = None,
) -> None:
    """Run the agent: keep the MQTT session, converge, serve the local API."""
    settings = _settings(state_dir, port=port, host=host, log_level=log_level)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx imports its own CLI (click, rich, pygments) when they are installed, and typer
    # installs them: about 5 MB of RSS the daemon never uses. A None entry makes that
    # optional import fail the way httpx expects when they are absent.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from agent.daemon import Agent

    try:
        Agent(settings).run()
    except CredentialsError as exc:
        raise _fail(exc, 2) from exc
    except AgentError as exc:
        raise _fail(exc) from exc


@app.command()
def status(
    state_dir: StateDir = None,
    port: Port = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show identity, connection, models, update state and outbox size."""
    from agent.config import load_identity

    settings = _settings(state_dir, port=port)
    try:
        identity = load_identity(settings)
    except AgentError as exc:
        raise _fail(exc) from exc
    try:
        info = _api(settings, "GET", "/v1/status")
        info["running"] = True
    except AgentError:
        info = _offline_status(settings, identity)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(f"device   {info['device_id']}  hub {info['hub_url']}  mqtt {info['mqtt']}")
    typer.echo(
        f"agent    {'running' if info['running'] else 'not running'}, {'connected' if info.get('connected') else 'disconnected'}"
    )
    outbox = info["outbox"]
    if isinstance(outbox, dict):
        outbox = (
            f"{outbox['telemetry_pending']} points + {outbox['messages_pending']} messages queued,"
            f" {outbox['dropped']} points dropped"
        )
    typer.echo(f"revision {info['applied_revision']}  outbox {outbox}")
    for m in info["models"]:
        extra = f"  error: {m['error']}" if m.get("error") else ""
        typer.echo(f"model    {m['name']}: {m['state']} active={m['active']} previous={m['previous']}{extra}")


def _offline_status(settings: Any, identity: Any) -> dict[str, Any]:
    from agent.store import Store

    info: dict[str, Any] = {
        "device_id": identity.device_id,
        "hub_url": identity.hub_url,
        "mqtt": f"{identity.mqtt_host}:{identity.mqtt_port}",
        "running": False,
        "connected": False,
        "applied_revision": 0,
        "outbox": 0,
        "models": [],
    }
    if settings.db_path.exists():
        store = Store(settings.db_path)
        info["applied_revision"] = int(store.get("applied_revision") or 0)
        info["outbox"] = store.outbox_stats().__dict__
        info["models"] = [
            {
                "name": r.name,
                "state": r.state.value,
                "active": r.active.version if r.active else None,
                "previous": r.previous.version if r.previous else None,
                "error": r.error,
            }
            for r in store.models()
        ]
        store.close()
    return info


@app.command()
def models(state_dir: StateDir = None, port: Port = None) -> None:
    """List the models the running agent serves."""
    settings = _settings(state_dir, port=port)
    try:
        data = _api(settings, "GET", "/v1/models")
    except AgentError as exc:
        raise _fail(exc) from exc
    if not data["models"]:
        typer.echo("no models active")
    for m in data["models"]:
        typer.echo(f"{m['name']}\t{m['version']}\t{m['target']}\t{','.join(m['providers'])}")


@app.command()
def predict(
    name: Annotated[str, typer.Argument(help="model name")],
    input: Annotated[str, typer.Argument(help="JSON body, a JSON/image file path, or text")],  # noqa: A002
    state_dir: StateDir = None,
    port: Port = None,
) -> None:
    """Send one prediction to the running agent and print the answer."""
    settings = _settings(state_dir, port=port)
    body: Any
    path = Path(input)
    if input.lstrip().startswith(("{", "[")):
        body = json.loads(input) if input.lstrip().startswith("{") else {"data": json.loads(input)}
    elif path.is_file() and path.suffix.lower() == ".json":
        body = json.loads(path.read_text())
    elif path.is_file():
        body = {"image": base64.b64encode(path.read_bytes()).decode()}
    else:
        body = {"text": input}
    try:
        data = _api(settings, "POST", f"/v1/models/{name}:predict", body)
    except AgentError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(data, indent=2))


@app.command()
def unenroll(
    state_dir: StateDir = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
) -> None:
    """Forget the identity, journal and cached models of this device."""
    from agent.config import delete_identity

    settings = _settings(state_dir)
    if not settings.identity_path.exists():
        raise _fail(AgentError(f"not enrolled (no {settings.identity_path})"))
    if not yes:
        typer.confirm(f"Forget this device's identity and models in {settings.state_dir}?", abort=True)
    delete_identity(settings)
    settings.db_path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(settings.db_path) + suffix).unlink(missing_ok=True)
    shutil.rmtree(settings.cache_dir, ignore_errors=True)
    typer.echo("unenrolled: identity, journal and cache removed")


def main() -> None:
    """Console-script entry point."""
    app()
