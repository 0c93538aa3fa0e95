"""``autodl-hub rollout``: start, watch and steer rollouts through a running hub's REST API.

The commands are HTTP clients: moving devices must reach the broker, which only the
running hub talks to. ``status --watch`` (and ``start --watch``) redraw a live progress
view until the rollout ends; when stdout is not a terminal (piped into `tee`, a CI log) they
print one plain line per change instead.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

from hub.cli.fleet import DEFAULT_HUB, HubOpt, KeyOpt, call_hub

__all__ = ["render", "rollout_app", "summary_line"]

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]
WatchOpt = Annotated[bool, typer.Option("--watch", "-w", help="show live progress until the rollout ends")]
ReasonOpt = Annotated[str, typer.Option(help="why (kept in the rollout's timeline)")]
TERMINAL = {"succeeded", "failed", "aborted"}
_STATE_STYLE = {
    "running": "cyan",
    "paused": "yellow",
    "succeeded": "green",
    "failed": "red",
    "aborted": "magenta",
    "updated": "green",
    "pending": "cyan",
    "reverted": "magenta",
    "baseline": "dim",
}

rollout_app = typer.Typer(help="Rollouts: start, status, pause, resume, promote, abort.", no_args_is_help=True)


def _styled(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def render(detail: dict[str, Any], max_devices: int = 20) -> Group:
    """Return the progress view of a rollout (GET /rollouts/{id}) as rich renderables."""
    moved = detail["updated"] + detail["failed"] + detail["pending"]
    head = Text.assemble(
        (f"{detail['id']}  ", "bold"),
        f"{detail['model']} {detail['baseline_version'] or '-'} -> {detail['version']}  ",
        _styled(detail["state"]),
        f"  step {detail['step']}/{len(detail['steps'])}  ",
        f"{detail['updated']}/{detail['devices']} devices updated",
        (f", {detail['failed']} failed" if detail["failed"] else "", "red"),
    )
    bar = ProgressBar(total=max(detail["devices"], 1), completed=detail["updated"], width=60)
    steps = Table(title="steps", show_edge=False, expand=False)
    for column in ("step", "percent", "devices", "status"):
        steps.add_column(column)
    for p in detail["progress"]:
        steps.add_row(str(p["step"]), f"{p['percent']:g}%", str(p["devices"]), p["status"])
    devices = Table(title=f"devices ({moved} on {detail['version']})", show_edge=False)
    devices.add_column("#")
    devices.add_column("device", no_wrap=True)
    for column in ("cohort step", "assigned", "running", "state", "online", "error"):
        devices.add_column(column)
    for d in detail["device_states"][:max_devices]:
        devices.add_row(
            str(d["position"]),
            d["device_id"],
            str(d["cohort_step"]),
            d["assigned_version"] or "-",
            d["active_version"] or "-",
            _styled(d["state"]),
            "yes" if d["online"] else "no",
            (d["error"] or "")[:60],
        )
    if len(detail["device_states"]) > max_devices:
        devices.caption = f"... {len(detail['device_states']) - max_devices} more"
    timeline = Table(title="timeline", show_edge=False)
    for column in ("time", "event", "message"):
        timeline.add_column(column)
    for e in detail["events"][-8:]:
        timeline.add_row(e["ts"][11:19], e["kind"], e["message"])
    reason = Text(f"reason: {detail['reason']}" if detail["reason"] else "", style="italic")
    return Group(head, bar, reason, steps, devices, timeline)


def summary_line(detail: dict[str, Any]) -> str:
    """Return one plain line of a rollout's progress (what --watch prints when stdout is not a terminal)."""
    line = (
        f"{detail['id']} {detail['model']} {detail['baseline_version'] or '-'} -> {detail['version']}: "
        f"{detail['state']}, step {detail['step']}/{len(detail['steps'])}, "
        f"{detail['updated']}/{detail['devices']} updated, {detail['pending']} pending, {detail['failed']} failed"
    )
    return f"{line}; {detail['reason']}" if detail["reason"] else line


def _watch(hub: str, key: str, rollout_id: str, interval: float) -> dict[str, Any]:
    from rich.live import Live

    detail: dict[str, Any] = call_hub(hub, key, "GET", f"/rollouts/{rollout_id}")
    console = Console()
    if not console.is_terminal:
        return _watch_plain(hub, key, detail, interval)
    with Live(render(detail), console=console, refresh_per_second=4) as live:
        while detail["state"] not in TERMINAL:
            time.sleep(interval)
            detail = call_hub(hub, key, "GET", f"/rollouts/{rollout_id}")
            live.update(render(detail))
    return detail


def _watch_plain(hub: str, key: str, detail: dict[str, Any], interval: float) -> dict[str, Any]:
    # A log has no cursor to redraw with: one line per change (the progress, each new timeline
    # event), flushed, so `tee` shows it at once.
    last = ""
    seen: set[tuple[str, str, str]] = set()
    while True:
        for event in detail["events"]:
            mark = (event["ts"], event["kind"], event["message"])
            if mark not in seen:
                seen.add(mark)
                typer.echo(f"{event['ts'][11:19]} {event['kind']}: {event['message']}")
        line = summary_line(detail)
        if line != last:
            typer.echo(line)
            last = line
        sys.stdout.flush()
        if detail["state"] in TERMINAL:
            return detail
        time.sleep(interval)
        detail = call_hub(hub, key, "GET", f"/rollouts/{detail['id']}")


def _finish(hub: str, key: str, detail: dict[str, Any], as_json: bool, watch: bool, interval: float) -> None:
    if watch:
        detail = _watch(hub, key, detail["id"], interval)
        if detail["state"] != "succeeded":
            raise typer.Exit(1)
        return
    if as_json:
        typer.echo(json.dumps(detail, indent=2, sort_keys=True))
    else:
        Console().print(render(detail))


def _pairs(items: list[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            typer.echo(f"error: label {item!r}: use key=value", err=True)
            raise typer.Exit(1)
        result[key] = value
    return result


@rollout_app.command("start")
def start(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="the version to roll out")],
    key: KeyOpt,
    hub: HubOpt = DEFAULT_HUB,
    device: Annotated[list[str], typer.Option(help="a device id (repeatable)")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option(help="key=value every device must carry (repeatable)")] = [],  # noqa: B006
    strategy: Annotated[str, typer.Option(help="canary or all-at-once")] = "canary",
    steps: Annotated[str, typer.Option(help="canary percentages, comma-separated")] = "10,50,100",
    step_pause: Annotated[float, typer.Option(help="seconds to hold every step")] = 0.0,
    approval: Annotated[bool, typer.Option(help="pause after every step until resumed")] = False,
    baseline: Annotated[str | None, typer.Option(help="version for devices outside the canary")] = None,
    min_devices: Annotated[int, typer.Option(help="devices that must run the new version per step")] = 1,
    max_failed_ratio: Annotated[float, typer.Option(help="failed updates tolerated (0-1)")] = 0.0,
    max_error_increase: Annotated[float, typer.Option(help="error-rate rise tolerated (0.05 = 5 points)")] = 0.05,
    max_latency_increase: Annotated[float, typer.Option(help="p95 latency rise tolerated (0.5 = +50%)")] = 0.5,
    min_observation: Annotated[float, typer.Option(help="seconds on a step before it may pass")] = 60.0,
    update_timeout: Annotated[float, typer.Option(help="seconds before slow devices stop holding a step")] = 600.0,
    watch: WatchOpt = False,
    interval: Annotated[float, typer.Option(help="seconds between two refreshes of --watch")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout of MODEL VERSION to every device, or to those given by --device / --label."""
    try:
        percentages = [float(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        typer.echo(f"error: --steps {steps!r}: use comma-separated percentages such as 10,50,100", err=True)
        raise typer.Exit(1) from None
    selector: dict[str, Any] = {"device_ids": device, "labels": _pairs(label)} if device or label else {"all": True}
    body = {
        "model": model,
        "version": version,
        "selector": selector,
        "strategy": strategy,
        "steps": percentages,
        "step_pause_s": step_pause,
        "require_approval": approval,
        "baseline_version": baseline,
        "analysis": {
            "min_devices_reporting": min_devices,
            "max_failed_ratio": max_failed_ratio,
            "max_error_rate_increase": max_error_increase,
            "max_latency_increase": max_latency_increase,
            "min_observation_s": min_observation,
            "update_timeout_s": update_timeout,
        },
    }
    detail = call_hub(hub, key, "POST", "/rollouts", json=body)
    _finish(hub, key, detail, as_json, watch, interval)


@rollout_app.command("status")
def status(
    key: KeyOpt,
    rollout_id: Annotated[str | None, typer.Argument(help="a rollout id; without it, list rollouts")] = None,
    hub: HubOpt = DEFAULT_HUB,
    model: Annotated[str | None, typer.Option(help="only rollouts of this model (list)")] = None,
    watch: WatchOpt = False,
    interval: Annotated[float, typer.Option(help="seconds between two refreshes of --watch")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Show one rollout (progress per step, state per device, timeline), or list them."""
    if rollout_id is None:
        params = {"model": model} if model else {}
        rows = call_hub(hub, key, "GET", "/rollouts", params=params)
        if as_json:
            typer.echo(json.dumps(rows, indent=2, sort_keys=True))
            return
        table = Table("model", "version", "state", "step", "updated", "failed", "devices", "created")
        table.columns.insert(0, Column("id", no_wrap=True))
        for r in rows:
            table.add_row(
                r["id"],
                r["model"],
                r["version"],
                _styled(r["state"]),
                f"{r['step']}/{len(r['steps'])}",
                str(r["updated"]),
                str(r["failed"]),
                str(r["devices"]),
                r["created_at"][:19],
            )
        Console().print(table)
        return
    detail = call_hub(hub, key, "GET", f"/rollouts/{rollout_id}")
    _finish(hub, key, detail, as_json, watch, interval)


def _action(name: str, help_text: str) -> None:
    def command(
        rollout_id: Annotated[str, typer.Argument(help="the rollout id")],
        key: KeyOpt,
        hub: HubOpt = DEFAULT_HUB,
        reason: ReasonOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        detail = call_hub(hub, key, "POST", f"/rollouts/{rollout_id}/{name}", json={"reason": reason})
        if as_json:
            typer.echo(json.dumps(detail, indent=2, sort_keys=True))
        else:
            typer.echo(f"{detail['id']}: {detail['state']} (step {detail['step']}/{len(detail['steps'])})")

    command.__doc__ = help_text
    rollout_app.command(name)(command)


_action("pause", "Pause a rollout: devices keep their versions, no step advances.")
_action("resume", "Resume a paused rollout.")
_action("promote", "Give every device of the rollout the new version now, skipping the remaining steps.")
_action("abort", "Abort a rollout: every device it moved returns to its previous version.")
