"""Fleet commands (``device``, ``model``, ``command``): clients of a running hub's REST API.

They go through the API rather than the database because deploying, decommissioning
and sending commands must also reach the broker, which only the running hub talks to.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer

from hub.config import HubSettings
from hub.tls import client_context

__all__ = ["DEFAULT_HUB", "HubOpt", "KeyOpt", "call_hub", "command_app", "device_app", "local_hub_url", "model_app"]

HubOpt = Annotated[
    str,
    typer.Option(
        "--hub",
        envvar="AUTODL_HUB_URL",
        help="the hub's URL",
        show_default="the local hub, at AUTODL_HUB_HOST/AUTODL_HUB_PORT as `serve` reads them",
    ),
]
KeyOpt = Annotated[str, typer.Option("--api-key", envvar="AUTODL_HUB_API_KEY", help="an API key", show_default=False)]
DEFAULT_HUB = ""  # no --hub and no AUTODL_HUB_URL: the local hub (`local_hub_url`)

device_app = typer.Typer(help="Devices: list, show, label, decommission, deploy.", no_args_is_help=True)
model_app = typer.Typer(help="Models: list, show, alias.", no_args_is_help=True)
command_app = typer.Typer(help="Commands: send.", no_args_is_help=True)


def local_hub_url() -> str:
    """Return the URL of the hub `autodl-hub serve` runs here with this environment (AUTODL_HUB_HOST/PORT)."""
    try:
        settings = HubSettings()
    except ValueError as exc:
        typer.echo(f"error: bad AUTODL_HUB_* settings ({exc}); or set AUTODL_HUB_URL to the hub's URL", err=True)
        raise typer.Exit(1) from exc
    # A hub bound to every interface answers on loopback too.
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else "[::1]" if settings.host == "::" else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'https' if settings.tls_enabled else 'http'}://{host}:{settings.port}"


def call_hub(hub: str, key: str, method: str, path: str, **kwargs: Any) -> Any:
    """Call the hub (`hub` empty: the local one); print its error and exit 1 on failure."""
    url = hub or local_hub_url()
    verify = client_context(HubSettings())  # the hub's CA (AUTODL_HUB_TLS_CA_FILE, or the local data dir's)
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30, verify=verify
        ) as client:
            response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        hint = (
            ""
            if hub
            else " (the local hub, from AUTODL_HUB_HOST/AUTODL_HUB_PORT as `serve` reads them;"
            " set AUTODL_HUB_URL or pass --hub for another one)"
        )
        typer.echo(f"error: cannot reach the hub at {url}{hint}: {exc}", err=True)
        raise typer.Exit(1) from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"error: {response.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return response.json()


def _pairs(items: list[str], what: str) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.echo(f"error: {what} {item!r}: use key=value", err=True)
            raise typer.Exit(1)
        result[key] = value
    return result


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


@device_app.command("list")
def device_list(
    key: KeyOpt,
    hub: HubOpt = DEFAULT_HUB,
    label: Annotated[list[str], typer.Option(help="key=value filter (repeatable)")] = [],  # noqa: B006
    online: Annotated[bool | None, typer.Option("--online/--offline", help="only devices on/offline")] = None,
    model: Annotated[str | None, typer.Option(help="devices reporting this model")] = None,
    version: Annotated[str | None, typer.Option(help="...at this version")] = None,
) -> None:
    """List devices."""
    params: dict[str, Any] = {"label": label}
    for name, value in (("online", online), ("model", model), ("version", version)):
        if value is not None:
            params[name] = value
    for d in call_hub(hub, key, "GET", "/devices", params=params):
        state = "online" if d["online"] else "offline"
        models = ",".join(f"{n}@{s.get('active')}" for n, s in ((d.get("reported") or {}).get("models") or {}).items())
        typer.echo(f"{d['id']}\t{d['name']}\t{state}\t{d['labels']}\t{models or '-'}")


@device_app.command("show")
def device_show(device_id: str, key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Show a device: facts, desired and reported state."""
    _show(call_hub(hub, key, "GET", f"/devices/{device_id}"))


@device_app.command("label")
def device_label(
    device_id: str,
    labels: Annotated[list[str], typer.Argument(help="key=value to set")],
    key: KeyOpt,
    hub: HubOpt = DEFAULT_HUB,
    remove: Annotated[list[str], typer.Option(help="label key to remove (repeatable)")] = [],  # noqa: B006
) -> None:
    """Set and remove labels of a device."""
    body = {"set": _pairs(labels, "label"), "remove": remove}
    _show(call_hub(hub, key, "PATCH", f"/devices/{device_id}/labels", json=body)["labels"])


@device_app.command("decommission")
def device_decommission(device_id: str, key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Revoke a device's credentials at once."""
    call_hub(hub, key, "POST", f"/devices/{device_id}/decommission")
    typer.echo(f"device {device_id} decommissioned")


@device_app.command("deploy")
def device_deploy(device_id: str, model: str, version: str, key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Make a device run VERSION (a version, 'latest' or an alias) of MODEL."""
    state = call_hub(hub, key, "PUT", f"/devices/{device_id}/models/{model}", json={"version": version})
    typer.echo(f"device {device_id} desired revision {state['revision']}: {model} {state['models'][model]['version']}")


@model_app.command("list")
def model_list(key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """List models with their versions and aliases."""
    for m in call_hub(hub, key, "GET", "/models"):
        aliases = ",".join(f"{a}={v}" for a, v in sorted(m["aliases"].items()))
        typer.echo(f"{m['name']}\t{m['task']}\t{len(m['versions'])} versions\t{aliases or '-'}")


@model_app.command("show")
def model_show(
    name: str,
    key: KeyOpt,
    hub: HubOpt = DEFAULT_HUB,
    version: Annotated[str | None, typer.Option(help="show one version (or alias) in full")] = None,
) -> None:
    """Show a model, or one of its versions."""
    path = f"/models/{name}" if version is None else f"/models/{name}/versions/{version}"
    _show(call_hub(hub, key, "GET", path))


@model_app.command("alias")
def model_alias(name: str, alias: str, version: str, key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Point ALIAS (such as stable) of model NAME at VERSION."""
    result = call_hub(hub, key, "PUT", f"/models/{name}/aliases/{alias}", json={"version": version})
    typer.echo(f"{name}: {alias} -> {result['aliases'][alias]}")


@command_app.command("send")
def command_send(
    name: str,
    key: KeyOpt,
    hub: HubOpt = DEFAULT_HUB,
    device: Annotated[str | None, typer.Option(help="one device id")] = None,
    selector: Annotated[list[str], typer.Option(help="key=value; every matching device (repeatable)")] = [],  # noqa: B006
    arg: Annotated[list[str], typer.Option(help="key=value argument (value parsed as JSON if it can be)")] = [],  # noqa: B006
    ttl: Annotated[int, typer.Option(help="seconds before an unanswered command expires")] = 3600,
) -> None:
    """Send a command (ping, deploy, rollback, reload, set-config, diagnostics, restart)."""
    args: dict[str, Any] = {}
    for k, v in _pairs(arg, "argument").items():
        try:
            args[k] = json.loads(v)
        except ValueError:
            args[k] = v
    body: dict[str, Any] = {"name": name, "args": args, "ttl_s": ttl}
    if device is not None:
        body["device_id"] = device
    if selector:
        body["selector"] = _pairs(selector, "selector")
    for row in call_hub(hub, key, "POST", "/commands", json=body):
        typer.echo(f"{row['id']}\t{row['device_id']}\t{row['status']}")
