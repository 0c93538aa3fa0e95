"""The ``autodl-agent`` command line: thin commands over the agent's modules.

Domain errors become exit code 1 with one clear line (credentials: exit code 2).
Heavy modules (onnxruntime, numpy, paho) load inside the commands, not at import, and
the parser is the standard library's: a CLI framework would stay in the daemon's memory.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import AgentError, CredentialsError


class CliError(AgentError):
    """A command failed: print the message and exit with the code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _settings(state_dir: Path | None = None, **overrides: Any) -> Any:
    from pydantic import ValidationError

    from agent.config import AgentSettings

    values = {k: v for k, v in overrides.items() if v is not None}
    if state_dir is not None:
        values["state_dir"] = state_dir
    try:
        return AgentSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CliError(f"bad settings (flags or AUTODL_AGENT_*): {problems}") from exc


def _fail(exc: Exception, code: int = 1) -> CliError:
    return CliError(str(exc), code)


def _base_url(settings: Any) -> str:
    from agent.store import Store

    port = settings.port
    if settings.db_path.exists():
        store = Store(settings.db_path)
        port = int(store.get("api_port") or port)
        store.close()
    return f"http://{settings.host}:{port}"


def _api(settings: Any, method: str, path: str, body: Any = None) -> Any:
    import httpx

    url = _base_url(settings) + path
    try:
        headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
        response = httpx.request(method, url, json=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        raise AgentError(f"the agent does not answer at {url} (is `autodl-agent run` running?): {exc}") from exc
    data = response.json()
    if response.status_code >= 400:
        raise AgentError(f"HTTP {response.status_code}: {data.get('error', data)}")
    return data


def version(_args: argparse.Namespace) -> None:
    """Print the agent version."""
    print(__version__)


def enroll(args: argparse.Namespace) -> None:
    """Enroll this device with a hub and store its identity."""
    from agent.enrollment import enroll as do_enroll

    labels: dict[str, str] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _fail(ValueError(f"label {item!r} is not k=v"))
        labels[key] = value
    settings = _settings(args.state_dir, ca_file=args.ca_file, insecure=args.insecure or None)
    try:
        identity = do_enroll(
            settings,
            args.hub,
            args.token,
            args.name,
            labels,
            args.force,
            ca_hash=args.ca_hash,
            device_cert=args.device_cert,
        )
    except AgentError as exc:
        raise _fail(exc) from exc
    print(f"enrolled as {identity.device_id} (hub {identity.hub_url}, mqtt {identity.mqtt_host}:{identity.mqtt_port})")


def run(args: argparse.Namespace) -> None:
    """Run the agent: keep the MQTT session, converge, serve the local API."""
    settings = _settings(
        args.state_dir, port=args.port, host=args.host, log_level=args.log_level, grpc_port=args.grpc_port
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx imports its own CLI (click, rich, pygments) when they are installed (the hub
    # installs them): about 5 MB of RSS the daemon never uses. A None entry makes that
    # optional import fail the way httpx expects when they are absent.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    from agent.runtime import tune_heap

    tune_heap(settings.malloc_arena_max, settings.malloc_mmap_threshold_kb)  # before any thread allocates
    from agent.daemon import Agent

    try:
        Agent(settings).run()
    except CredentialsError as exc:
        raise _fail(exc, 2) from exc
    except AgentError as exc:
        raise _fail(exc) from exc


def status(args: argparse.Namespace) -> None:
    """Show identity, connection, models, update state and outbox size."""
    from agent.config import load_identity

    settings = _settings(args.state_dir, port=args.port)
    try:
        identity = load_identity(settings)
    except AgentError as exc:
        raise _fail(exc) from exc
    try:
        info = _api(settings, "GET", "/v1/status")
        info["running"] = True
    except AgentError:
        info = _offline_status(settings, identity)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"device   {info['device_id']}  hub {info['hub_url']}  mqtt {info['mqtt']}")
    print(
        f"agent    {'running' if info['running'] else 'not running'}, {'connected' if info.get('connected') else 'disconnected'}"
    )
    outbox = info["outbox"]
    if isinstance(outbox, dict):
        outbox = (
            f"{outbox['telemetry_pending']} points + {outbox['messages_pending']} messages queued,"
            f" {outbox['dropped']} points dropped"
        )
    print(f"revision {info['applied_revision']}  outbox {outbox}")
    if keys := info.get("signing_keys"):
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(keys["refused"].items())) or "none"
        print(
            f"keys     trusted {', '.join(keys['trusted'])}; retired {', '.join(keys['retired']) or '-'}; refused {refused}"
        )
    for m in info["models"]:
        extra = f"  error: {m['error']}" if m.get("error") else ""
        print(f"model    {m['name']}: {m['state']} active={m['active']} previous={m['previous']}{extra}")


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


def models(args: argparse.Namespace) -> None:
    """List the models the running agent serves."""
    settings = _settings(args.state_dir, port=args.port)
    try:
        data = _api(settings, "GET", "/v1/models")
    except AgentError as exc:
        raise _fail(exc) from exc
    if not data["models"]:
        print("no models active")
    for m in data["models"]:
        print(f"{m['name']}\t{m['version']}\t{m['target']}\t{','.join(m['providers'])}")


def predict(args: argparse.Namespace) -> None:
    """Send one prediction to the running agent and print the answer."""
    settings = _settings(args.state_dir, port=args.port)
    body: Any
    raw, path = args.input, Path(args.input)
    if raw.lstrip().startswith(("{", "[")):
        body = json.loads(raw) if raw.lstrip().startswith("{") else {"data": json.loads(raw)}
    elif path.is_file() and path.suffix.lower() == ".json":
        body = json.loads(path.read_text())
    elif path.is_file():
        body = {"image": base64.b64encode(path.read_bytes()).decode()}
    else:
        body = {"text": raw}
    try:
        data = _api(settings, "POST", f"/v1/models/{args.name}:predict", body)
    except AgentError as exc:
        raise _fail(exc) from exc
    print(json.dumps(data, indent=2))


def generate(args: argparse.Namespace) -> None:
    """Stream text from a text-generation model of the running agent (--chat: a conversation)."""
    from agent.generate_cli import generate as run_generate

    settings = _settings(args.state_dir, port=args.port)
    try:
        run_generate(args, _base_url(settings))
    except AgentError as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        raise CliError("interrupted") from None


def unenroll(args: argparse.Namespace) -> None:
    """Forget the identity, journal and cached models of this device."""
    from agent.config import delete_identity

    settings = _settings(args.state_dir)
    if not settings.identity_path.exists():
        raise _fail(AgentError(f"not enrolled (no {settings.identity_path})"))
    if not args.yes:
        answer = input(f"Forget this device's identity and models in {settings.state_dir}? [y/N]: ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("aborted")
    delete_identity(settings)
    settings.db_path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(settings.db_path) + suffix).unlink(missing_ok=True)
    shutil.rmtree(settings.cache_dir, ignore_errors=True)
    print("unenrolled: identity, journal and cache removed")


def parser() -> argparse.ArgumentParser:
    """Return the command-line parser, one sub-command per function above."""
    root = argparse.ArgumentParser(
        prog="autodl-agent", description="autodl edge agent: enroll with a hub, run models, report back."
    )
    commands = root.add_subparsers(title="commands", metavar="COMMAND")

    def command(func: Callable[[argparse.Namespace], None], *, state: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(func.__name__, help=(func.__doc__ or "").splitlines()[0])
        sub.set_defaults(func=func)
        if state:
            sub.add_argument("--state-dir", type=Path, help="state directory (env AUTODL_AGENT_STATE_DIR)")
        return sub

    def port(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--port", type=int, help="local API port (env AUTODL_AGENT_PORT, default 8500)")

    command(version, state=False)
    sub = command(enroll)
    sub.add_argument("--hub", required=True, help="hub URL, e.g. https://hub:8080")
    sub.add_argument("--token", required=True, help="enrollment token")
    sub.add_argument("--ca-hash", help="sha256:<hex> of the hub CA's public key (printed by `autodl-hub token create`)")
    sub.add_argument("--ca-file", type=Path, help="CA file for a hub and broker with certificates from elsewhere")
    sub.add_argument("--insecure", action="store_true", help="allow plain HTTP and MQTT to a hub beyond loopback")
    sub.add_argument(
        "--device-cert", action="store_true", help="MQTT with a device certificate (key made here, never sent)"
    )
    sub.add_argument("--name", help="device name")
    sub.add_argument("--label", action="append", default=[], metavar="K=V", help="label (repeatable)")
    sub.add_argument("--force", action="store_true", help="enroll again even if enrolled")
    sub = command(run)
    port(sub)
    sub.add_argument("--host", help="local API bind address (env AUTODL_AGENT_HOST)")
    sub.add_argument(
        "--grpc-port", type=int, help="KServe v2 gRPC port, with the grpc extra (env AUTODL_AGENT_GRPC_PORT)"
    )
    sub.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    sub = command(status)
    port(sub)
    sub.add_argument("--json", action="store_true", help="print JSON")
    port(command(models))
    sub = command(predict)
    port(sub)
    sub.add_argument("name", help="model name")
    sub.add_argument("input", help="JSON body, a JSON/image file path, or text")
    sub = command(generate)
    port(sub)
    from agent.generate_cli import add_arguments

    add_arguments(sub)
    sub = command(unenroll)
    sub.add_argument("--yes", action="store_true", help="do not ask")
    return root


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli = parser()
    args = cli.parse_args(argv)
    if not hasattr(args, "func"):
        cli.print_help()
        raise SystemExit(2)
    try:
        args.func(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.code) from None
