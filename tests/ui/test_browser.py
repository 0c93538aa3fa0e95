"""The dashboard in a real browser: Chromium (Debian's) driven by Playwright against a real hub
process, mosquitto with dynamic security and two enrolled `autodl-agent run` processes.

Telemetry and command results reach the hub the way an agent sends them: over MQTT, logged
in with the device's own enrolled credentials. Screenshots land in test-artifacts/ui/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.agent import AgentProcess
from tests.support.dashboard import SERVING, TELEMETRY_NAMES, DeviceVoice, publish_versions, telemetry_points
from tests.support.fleet import HUB_JUDGES_LATENCY, Fleet
from tests.support.hub import HubProcess
from tests.support.waiting import wait_for

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
MODEL = "clf"
POINTS = 30  # per telemetry name and device
SEQ_BASE = 10**12  # far from the sequence numbers a real agent's telemetry uses

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install -y chromium"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (dev extra)")
Page = sync_api.Page
expect = sync_api.expect


@dataclass
class Stack:
    fleet: Fleet
    viewer: str
    rollout_id: str

    @property
    def hub(self) -> HubProcess:
        return self.fleet.hub

    @property
    def operator(self) -> str:
        return self.fleet.key

    @property
    def agents(self) -> list[AgentProcess]:
        return self.fleet.agents

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.fleet.api(method, path, **kwargs)

    @property
    def canary(self) -> AgentProcess:
        """The agent the rollout's first step moved."""
        detail = self.api("GET", f"/rollouts/{self.rollout_id}")
        first = next(d["device_id"] for d in detail["device_states"] if d["cohort_step"] == 1)
        return next(a for a in self.agents if a.device_id == first)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("ui-e2e")
    publish = partial(publish_versions, model=MODEL, workdir=root / "files")
    with Fleet(
        root, model=MODEL, initial="1.0.0", publish=publish, labels={"site": "lab"}, agent_env=HUB_JUDGES_LATENCY
    ) as fleet:
        yield _with_telemetry_and_a_rollout(fleet, viewer=fleet.hub.new_key("viewer"))


def _with_telemetry_and_a_rollout(fleet: Fleet, viewer: str) -> Stack:
    """Send every agent's telemetry over MQTT as the device itself; start a rollout of 2.0.0 that holds at 50%."""
    now = datetime.now(UTC)
    for agent in fleet.agents:
        with DeviceVoice(agent.state_dir) as device:
            device.telemetry(telemetry_points(MODEL, "1.0.0", SEQ_BASE, now, POINTS))
    for agent in fleet.agents:
        wait_for(
            f"telemetry of {agent.device_id} in the hub",
            lambda a=agent: _telemetry_count(fleet, a.device_id) >= len(TELEMETRY_NAMES) * POINTS,  # type: ignore[misc]
        )
    spec = {
        "model": MODEL,
        "version": "2.0.0",
        "steps": [50, 100],
        "analysis": {"min_observation_s": 3600, "min_devices_reporting": 1},
    }
    stack = Stack(fleet, viewer, fleet.api("POST", "/rollouts", json=spec)["id"])
    wait_for("the canary to serve 2.0.0", lambda: stack.canary.serving(MODEL) == "2.0.0")
    wait_for(
        "the hub to see the canary updated", lambda: stack.api("GET", f"/rollouts/{stack.rollout_id}")["updated"] == 1
    )
    return stack


def _telemetry_count(fleet: Fleet, device_id: str) -> int:
    return len(fleet.api("GET", f"/telemetry?device_id={device_id}&limit=100000")["points"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def _signed_in(browser: Any, stack: Stack, key: str, path: str = "/ui/") -> Page:
    """Open `path` in a fresh browser context, sign in on the form it redirects to, return the page."""
    context = browser.new_context(base_url=stack.hub.url, viewport={"width": 1360, "height": 900})
    page: Page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(path)
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.fill("#key", key)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(re.escape(path) + "$"))
    return page


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_fleet_overview_shows_presence_labels_versions_and_update_states(browser: Any, stack: Stack) -> None:
    page = _signed_in(browser, stack, stack.operator)
    expect(page.locator("#role")).to_have_text("operator")
    expect(page.locator("#count-total")).to_have_text("2")
    expect(page.locator("#count-online")).to_have_text("2")
    expect(page.locator("#by-label")).to_contain_text("site=lab")
    versions = page.locator("#by-version tbody tr")
    expect(versions).to_have_count(2)
    expect(versions.nth(0)).to_contain_text("1.0.0")
    expect(versions.nth(1)).to_contain_text("2.0.0")
    expect(page.locator("#update-states")).to_contain_text("active")
    expect(page.locator("#devices tbody tr")).to_have_count(2)
    _shot(page, "fleet")
    assert page.errors == []  # type: ignore[attr-defined]


def test_device_page_draws_telemetry_charts_and_round_trips_a_command(browser: Any, stack: Stack) -> None:
    agent = stack.canary
    page = _signed_in(browser, stack, stack.operator, f"/ui/devices/{agent.device_id}")
    row = page.locator(f'#state tr[data-model="{MODEL}"]')
    expect(row.locator("td.desired")).to_have_text("2.0.0")
    expect(row.locator("td.active")).to_have_text("2.0.0")
    expect(page.locator("#history")).to_contain_text(stack.rollout_id)

    # A real agent may add series of its own (disk, temperature...): ours must all be drawn.
    expected = {f"{name} ({MODEL})" for name in SERVING} | {"cpu_percent", "memory_percent"}
    lines = page.locator("#charts svg polyline")
    wait_for("every chart line", lambda: lines.count() >= len(expected), timeout=15)
    charts = page.locator("#charts .chart")
    keys = [charts.nth(i).get_attribute("data-chart") for i in range(charts.count())]
    assert keys[:4] == ["latency", "throughput", "requests", "cpu"] and "memory_percent" in keys
    # One unit per chart, and every axis label fits inside its chart (none cut at the left edge).
    units = {key: page.locator(f'.chart[data-chart="{key}"] svg').get_attribute("data-axis-unit") for key in keys}
    assert units["latency"] in ("ms", "s") and units["cpu"] == units["memory_percent"] == "%", units
    if "memory" in keys:  # the real agent's memory_used_bytes and process_rss_bytes
        assert units["memory"] in ("KB", "MB", "GB"), units
    # In one evaluation: the page redraws its charts as telemetry arrives.
    cut = page.evaluate(
        """() => Array.from(document.querySelectorAll('.chart svg text.tick'))
                .filter(t => t.getBoundingClientRect().left < t.ownerSVGElement.getBoundingClientRect().left - 0.5)
                .map(t => t.textContent)"""
    )
    assert page.locator(".chart svg text.tick").count() > 8 and cut == [], cut
    drawn = {
        lines.nth(i).get_attribute("data-series"): int(lines.nth(i).get_attribute("data-count") or 0)
        for i in range(lines.count())
    }
    series = {name: drawn.get(name, 0) for name in expected}
    assert all(count >= POINTS for count in series.values()), series
    box = lines.first.bounding_box()
    assert box is not None and box["width"] > 200  # the line spans the chart, not a dot

    page.select_option("#command-name", "diagnostics")
    page.fill("#command-args", '{"verbose": true}')
    page.click("#send-command")
    expect(page).to_have_url(re.compile(r"#commands$"))
    command = page.locator("#command-results tbody tr").first
    expect(command).to_contain_text("diagnostics")
    command_id = command.get_attribute("data-command")
    assert command_id
    stored = stack.api("GET", f"/commands/{command_id}")
    assert stored["args"] == {"verbose": True} and stored["status"] in ("sent", "succeeded")
    if stored["status"] == "sent":  # the agent does not answer this command itself (yet): answer as the device
        with DeviceVoice(agent.state_dir) as device:
            device.answer(command_id, {"cpu_count": 2, "note": "from the device"})
    wait_for("the command's result", lambda: stack.api("GET", f"/commands/{command_id}")["status"] == "succeeded")
    page.reload()
    result = page.locator(f'#command-results tr[data-command="{command_id}"]')
    expect(result).to_contain_text("succeeded")
    _shot(page, "device")
    assert page.errors == []  # type: ignore[attr-defined]


def test_models_page_shows_variants_gate_figures_skipped_targets_and_aliases(browser: Any, stack: Stack) -> None:
    page = _signed_in(browser, stack, stack.viewer, "/ui/models")
    page.click(f'#models a:text("{MODEL}")')
    expect(page).to_have_url(re.compile(f"/ui/models/{MODEL}$"))
    expect(page.locator("#aliases")).to_contain_text("stable → 1.0.0")
    expect(page.locator("#aliases")).to_contain_text("latest → 2.0.0")
    newest = page.locator(".version").first
    expect(newest).to_have_attribute("data-version", "2.0.0")
    variant = newest.locator('table.variants tr[data-target="cpu-fp32"]')
    expect(variant.locator("td.accuracy")).to_have_text("0.934")
    expect(variant.locator("td.latency")).to_have_text("0.038")
    expect(variant.locator("td.size")).not_to_be_empty()
    expect(newest.locator('.skipped li[data-target="cpu-int8"]')).to_contain_text("accuracy drop 0.031 > 0.01")
    _shot(page, "model")


def test_operator_pauses_a_running_rollout_from_its_page(browser: Any, stack: Stack) -> None:
    page = _signed_in(browser, stack, stack.operator, "/ui/rollouts")
    page.click(f'#rollouts a:text("{stack.rollout_id}")')
    expect(page.locator("#rollout-state")).to_have_text("running")
    expect(page.locator('.step[data-step="1"] progress')).to_have_attribute("value", "1")
    expect(page.locator("#rollout-devices tbody tr")).to_have_count(2)
    # The live part refreshes itself: wait for one refresh so the click lands on the current buttons.
    expect(page.locator("#live")).to_have_attribute("data-refreshed", re.compile(r"\d+"))
    _shot(page, "rollout-running")
    page.click("#action-pause")
    expect(page.locator("#rollout-state")).to_have_text("paused")
    expect(page.locator("#action-resume")).to_be_enabled()
    detail = stack.api("GET", f"/rollouts/{stack.rollout_id}")
    assert detail["state"] == "paused"
    assert any(e["kind"] == "pause" and "fleet-operator" in e["actor"] for e in detail["events"])
    expect(page.locator("#timeline")).to_contain_text("pause")
    _shot(page, "rollout-paused")
    assert page.errors == []  # type: ignore[attr-defined]


def test_viewer_sees_everything_but_cannot_act(browser: Any, stack: Stack) -> None:
    page = _signed_in(browser, stack, stack.viewer, f"/ui/rollouts/{stack.rollout_id}")
    expect(page.locator("#role")).to_have_text("viewer")
    state = page.locator("#rollout-state").inner_text()
    for action in ("resume", "promote", "abort") if state == "paused" else ("pause", "promote", "abort"):
        expect(page.locator(f"#action-{action}")).to_be_disabled()
    expect(page.locator("#read-only")).to_be_visible()
    _shot(page, "viewer-rollout")

    # Even a hand-made POST with the viewer's own valid CSRF token is refused.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    response = page.request.post(f"/ui/rollouts/{stack.rollout_id}/abort", form={"csrf": csrf or ""})
    assert response.status == 403
    agent = stack.agents[0]
    response = page.request.post(
        f"/ui/devices/{agent.device_id}/commands", form={"csrf": csrf or "", "name": "restart"}
    )
    assert response.status == 403
    assert stack.api("GET", f"/rollouts/{stack.rollout_id}")["state"] == state
    assert not [c for c in stack.api("GET", f"/commands?device_id={agent.device_id}") if c["name"] == "restart"]

    page.goto(f"/ui/devices/{agent.device_id}")
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#command-form")).to_have_count(0)
    expect(page.locator("#charts svg polyline").first).to_be_visible()
    _shot(page, "viewer-device")


def test_signing_out_ends_the_session(browser: Any, stack: Stack) -> None:
    page = _signed_in(browser, stack, stack.viewer)
    page.click("header .who button")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.goto("/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    assert httpx.get(f"{stack.hub.url}/ui/", follow_redirects=False).status_code == 303
