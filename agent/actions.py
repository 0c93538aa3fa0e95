"""What each device command does on a running agent (see agent.commands for delivery rules)."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from pydantic import ValidationError

from agent import __version__
from agent.commands import Action, CommandError
from agent.config import AgentSettings, Identity
from agent.healing import reload, rollback
from agent.runtime import ModelRegistry
from agent.store import Store
from agent.updates import Updater
from shared import routes
from shared.messages import CommandName, DesiredModel, UpdateState

__all__ = ["SETTABLE", "CommandTarget", "apply_config", "build_actions"]

logger = logging.getLogger(__name__)

# Settings `set-config` may change on a running agent (and that survive a restart).
SETTABLE = frozenset(
    {
        "log_level",
        "telemetry_interval_s",
        "heartbeat_s",
        "outbox_max_mb",
        "outbox_batch",
        "telemetry_max_points_s",
        "telemetry_burst_s",
        "command_rate",
        "health_window_s",
        "health_min_requests",
        "health_latency_ratio",
        "health_latency_min_ms",
        "health_error_delta",
        "watchdog_stuck_s",
        "watchdog_errors",
        "batching",
        "capture",
        "capture_interval_s",
    }
)


def apply_config(settings: AgentSettings, changes: dict[str, Any]) -> dict[str, Any]:
    """Validate `changes` against the settings schema and apply them in place; return them."""
    unknown = sorted(set(changes) - SETTABLE)
    if unknown:
        raise CommandError(f"cannot set {unknown}; settable: {sorted(SETTABLE)}")
    try:
        checked = AgentSettings.model_validate({**settings.model_dump(), **changes})
    except ValidationError as exc:
        raise CommandError(f"invalid configuration: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
    applied = {key: getattr(checked, key) for key in changes}
    for key, value in applied.items():
        setattr(settings, key, value)
    if "log_level" in applied:
        logging.getLogger().setLevel(str(applied["log_level"]).upper())
    return applied


def _model_name(args: dict[str, Any]) -> str:
    name = args.get("model")
    if not isinstance(name, str) or not name:
        raise CommandError("argument 'model' (a model name) is required")
    return name


class CommandTarget(Protocol):
    """What the commands act on: the running agent (agent.daemon.Agent), seen only through these."""

    settings: AgentSettings
    identity: Identity
    store: Store
    registry: ModelRegistry
    updater: Updater

    def save_config(self, applied: dict[str, Any]) -> None:
        """Keep `set-config` changes across restarts."""

    def diagnostics(self) -> dict[str, Any]:
        """Return what the `diagnostics` command answers."""

    def request_restart(self) -> None:
        """Restart the process once the pending results are acknowledged."""


def build_actions(agent: CommandTarget) -> dict[CommandName, Action]:
    """Return the command table of one agent."""
    started = time.monotonic()

    def ping(args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "agent_version": __version__, "uptime_s": round(time.monotonic() - started, 3)}

    def deploy(args: dict[str, Any]) -> dict[str, Any]:
        name, version = _model_name(args), args.get("version")
        if not isinstance(version, str):
            raise CommandError("argument 'version' is required")
        url = args.get("manifest_url") or routes.url(agent.identity.hub_url, routes.manifest(name, version))
        agent.updater.want(name, DesiredModel(version=version, manifest_url=url))
        timeout = float(args.get("timeout_s", 120))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            serving = agent.registry.get(name)
            record = agent.store.model(name)
            if serving is not None and serving.version == version:
                return {"model": name, "version": version, "state": record.state.value}
            if record.state == UpdateState.ROLLED_BACK and record.failed and record.failed.startswith(f"{version}@"):
                raise CommandError(f"{name} {version} refused: {record.error}")
            time.sleep(0.1)
        raise CommandError(f"{name} {version} not active after {timeout:.0f}s")

    def rollback_(args: dict[str, Any]) -> dict[str, Any]:
        name = _model_name(args)
        reason = str(args.get("reason") or "rollback command")
        return {"model": name, "version": rollback(agent.updater, name, reason)}

    def reload_(args: dict[str, Any]) -> dict[str, Any]:
        names = [_model_name(args)] if "model" in args else [m.name for m in agent.registry.all()]
        return {"reloaded": {name: reload(agent.updater, name) for name in names}}

    def set_config(args: dict[str, Any]) -> dict[str, Any]:
        applied = apply_config(agent.settings, args)
        agent.save_config(applied)
        return {"applied": applied}

    def diagnostics(args: dict[str, Any]) -> dict[str, Any]:
        return agent.diagnostics()

    def restart(args: dict[str, Any]) -> dict[str, Any]:
        agent.request_restart()
        return {"restarting": True}

    return {
        CommandName.PING: ping,
        CommandName.DEPLOY: deploy,
        CommandName.ROLLBACK: rollback_,
        CommandName.RELOAD: reload_,
        CommandName.SET_CONFIG: set_config,
        CommandName.DIAGNOSTICS: diagnostics,
        CommandName.RESTART: restart,
    }
