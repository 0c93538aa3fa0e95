"""Monitoring as operators run it: promtool on the rules and on live /metrics, valid dashboards
whose every query names a metric a real hub or agent exposes, and the monitoring component.

The live side is a real hub process, mosquitto and an agent serving a model (tests/e2e's
harness), with a rollout paused at its first step so the rollout metrics have samples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.agent import AgentProcess
from tests.support.broker import secured_broker
from tests.support.hub import HubProcess
from tests.support.paths import K3S
from tests.support.waiting import wait_for

MONITORING = K3S / "components" / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
RULES = MONITORING / "alerts.yaml"
MODEL = "clf"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}

# PromQL words that are not metric names.
_PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "delta", "histogram_quantile", "by",
    "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "clamp_min", "clamp_max",
    "abs", "time", "label_values", "offset", "bool", "topk", "bottomk", "changes", "absent", "vector",
}  # fmt: skip
# Series Prometheus itself adds to every scrape target.
_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: `make test-system-deps` installs Debian's prometheus package")
    return found


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Return {"hub": text, "agent": text}: /metrics of a real hub and agent that did some work."""
    root = tmp_path_factory.mktemp("metrics-live")
    broker = secured_broker(root / "mosquitto")
    hub = HubProcess(root / "hub", broker)
    agent = AgentProcess(root / "agent")
    try:
        key, token = hub.prepare(MODEL, {"1.0.0": {"seed": 1}, "2.0.0": {"seed": 2}})
        hub.start()
        agent.enroll(hub.url, token)
        agent.start().wait_live()
        hub.call("PUT", key=key, path=f"/devices/{agent.device_id}/models/{MODEL}", json={"version": "1.0.0"})
        wait_for("the agent to serve 1.0.0", lambda: agent.serving(MODEL) == "1.0.0")
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                assert client.post(f"http://127.0.0.1:{agent.port}/v2/models/{MODEL}/infer", json=BODY).is_success
        rollout = {"model": MODEL, "version": "2.0.0", "selector": {"all": True}, "steps": [100]}
        rollout_id = hub.call("POST", key=key, path="/rollouts", json=rollout)["id"]
        hub.call("POST", key=key, path=f"/rollouts/{rollout_id}/pause", json={})
        wait_for("agent telemetry at the hub", lambda: "telemetry" in httpx.get(hub.url + "/metrics").text)
        yield {
            "hub": httpx.get(hub.url + "/metrics", timeout=10).text,
            "agent": httpx.get(f"http://127.0.0.1:{agent.port}/metrics", timeout=10).text,
        }
    finally:
        agent.stop()
        hub.stop()
        broker.stop()


def _exposed(text: str) -> set[str]:
    """Return every series name the exposition offers (samples, and families declared by TYPE)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression reads (strings, matchers, ranges, groupings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\w+", " ", expr)
    tokens = re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
    return {t for t in tokens if t not in _PROMQL_WORDS and not re.fullmatch(r"e\d*|inf|nan", t, re.I)}


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert match, f"{variable['name']}: {query}"
            queries.append(match.group(1))
    return queries


def _rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


# -- promtool ----------------------------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a PromQL syntax error does not pass."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}))
    out = subprocess.run([_promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0


@pytest.mark.e2e
@pytest.mark.parametrize("side", ["hub", "agent"])
def test_live_metrics_pass_promtool(live_metrics: dict[str, str], side: str) -> None:
    out = subprocess.run(
        [_promtool(), "check", "metrics"], input=live_metrics[side], capture_output=True, text=True, timeout=60
    )
    # promtool prints each convention it finds broken (missing help, counter without _total, ...).
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


# -- dashboards ---------------------------------------------------------------------------------

# The parts of Grafana's dashboard JSON model (schemaVersion 39) that provisioning reads.
_TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "expr": {"type": "string", "minLength": 1}},
}
_PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos", "datasource", "targets", "fieldConfig"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["timeseries", "stat", "bargauge", "table", "gauge"]},
        "title": {"type": "string", "minLength": 1},
        "datasource": {"const": {"type": "prometheus", "uid": "${datasource}"}},
        "gridPos": {
            "type": "object",
            "required": ["h", "w", "x", "y"],
            "properties": {
                "h": {"type": "integer", "minimum": 1},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
            },
        },
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {
                "defaults": {
                    "type": "object",
                    "required": ["unit"],
                    "properties": {"unit": {"enum": ["short", "none", "s", "bytes", "percentunit", "reqps", "ops"]}},
                }
            },
        },
        "targets": {"type": "array", "minItems": 1, "items": _TARGET},
    },
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "time", "tags"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type"],
                        "properties": {"type": {"enum": ["datasource", "query", "custom", "interval"]}},
                    },
                }
            },
        },
        "time": {"type": "object", "required": ["from", "to"]},
        "tags": {"type": "array", "contains": {"const": "autodl"}},
    },
}


def test_the_four_dashboards_ship() -> None:
    assert [p.stem for p in DASHBOARDS] == ["autodl-fleet", "autodl-hub", "autodl-serving", "autodl-training"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid_grafana_json(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    assert dashboard["uid"] == path.stem
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the grid"
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds repeat"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(dashboard["panels"]))) - {"__rate_interval", "__interval"}
    assert used <= variables, f"undefined variables {used - variables}"


def test_query_names_are_extracted_as_promql_reads_them() -> None:
    expr = (
        'sum by (le, model) (rate(a_seconds_bucket{model=~"$model", x="rate(b)"}[$__rate_interval])) / clamp_min(c, 1)'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "c"}
    assert metric_names('up{job="autodl-hub"} == 0') == {"up"}


@pytest.mark.e2e
def test_every_dashboard_and_alert_query_names_a_live_metric(live_metrics: dict[str, str]) -> None:
    exposed = _exposed(live_metrics["hub"]) | _exposed(live_metrics["agent"]) | _SYNTHETIC
    queries = [q for path in DASHBOARDS for q in _dashboard_queries(json.loads(path.read_text()))]
    queries += _rule_queries()
    read = {name for q in queries for name in metric_names(q)}
    assert len(read) > 20  # the extraction found the queries' metrics at all
    missing = sorted(read - exposed)
    assert not missing, f"queried but not exposed by a live hub or agent: {missing}"


@pytest.mark.e2e
def test_a_renamed_metric_would_be_caught(live_metrics: dict[str, str]) -> None:
    """The comparison above fails for a name neither side exposes (e.g. the old agent names)."""
    exposed = _exposed(live_metrics["hub"]) | _exposed(live_metrics["agent"])
    assert "autodl_requests_total" not in exposed and "autodl_hub_api_request_seconds_bucket" not in exposed
    assert "autodl_agent_requests_total" in exposed and "autodl_hub_rollout_step" in exposed
    assert re.search(r'^autodl_hub_rollouts\{state="paused"\} 1\.0$', live_metrics["hub"], re.M)


# -- the monitoring component ----------------------------------------------------------------------


def test_scrape_config_selects_annotated_pods_and_loads_the_rules() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yaml").read_text())
    assert [(MONITORING / f).exists() for f in config["rule_files"]] == [True]
    (job,) = config["scrape_configs"]
    relabels = job["relabel_configs"]
    assert relabels[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert any(r.get("target_label") == "job" for r in relabels)  # the rules select job="autodl-hub"
    for relabel in relabels:
        re.compile(relabel.get("regex", ".*"))


def test_monitoring_component_annotates_pods_and_ships_rules_and_dashboards(
    render: Callable[[Path], list[dict[str, Any]]], tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths to other kustomizations
                "resources": [os.path.relpath(K3S / "overlays" / "k3s", overlay)],
                "components": [os.path.relpath(MONITORING, overlay)],
            }
        )
    )
    docs = render(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)  # raises if invalid
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]
        for d in docs
        if d["kind"] in ("Deployment", "DaemonSet")
    }
    assert pods["autodl-hub"]["annotations"]["prometheus.io/port"] == "8080"
    assert pods["autodl-agent"]["annotations"]["prometheus.io/port"] == "8500"
    maps = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in docs if d["kind"] == "ConfigMap"}
    assert set(maps["autodl-grafana-dashboards"]["data"]) == {p.name for p in DASHBOARDS}
    assert maps["autodl-grafana-dashboards"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert yaml.safe_load(maps["autodl-prometheus"]["data"]["alerts.yaml"]) == yaml.safe_load(RULES.read_text())
