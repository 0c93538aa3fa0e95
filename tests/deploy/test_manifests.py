"""Every K3s overlay renders, validates against the Kubernetes schemas, and holds together."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agent.config import AgentSettings
from agent.entrypoint import ENV_VARS as AGENT_ENTRYPOINT_ENV
from hub.config import HubSettings
from tests.support.paths import K3S, OVERLAYS

Render = Callable[[Path], list[dict[str, Any]]]
Doc = dict[str, Any]

# KubeEdge 1.20 supports Kubernetes 1.30; K3s is usually current. Check both ends.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _pod(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def _containers(pod: Doc) -> Iterator[Doc]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _validate(doc: Doc, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(exc.message)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(render: Render, overlay: str) -> None:
    docs = render(K3S / "overlays" / overlay)
    assert docs, "the overlay rendered nothing"
    for doc in docs:
        for version in K8S_VERSIONS:
            _validate(doc, version)


def test_base_renders_and_validates_strictly(render: Render) -> None:
    for doc in render(K3S / "base"):
        _validate(doc, K8S_VERSIONS[-1])


def test_strict_validation_rejects_an_unknown_field(render: Render) -> None:
    hub = copy.deepcopy(_find(render(K3S / "overlays" / "k3s"), "Deployment", "autodl-hub"))
    _pod(hub)["containers"][0]["livenessProbes"] = []  # a typo a lenient check would let through
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hub, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_the_whole_stack(render: Render, overlay: str) -> None:
    docs = render(K3S / "overlays" / overlay)
    _find(docs, "Namespace", "autodl")
    for kind, name in [
        ("ConfigMap", "autodl-hub"),
        ("PersistentVolumeClaim", "autodl-hub-data"),
        ("Deployment", "autodl-hub"),
        ("Service", "autodl-hub"),
        ("Deployment", "autodl-mosquitto"),
        ("Service", "autodl-mosquitto"),
        ("StatefulSet", "autodl-postgres"),
        ("DaemonSet", "autodl-agent"),
        ("HorizontalPodAutoscaler", "autodl-hub"),
    ]:
        _find(docs, kind, name)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in ("Namespace", "RuntimeClass")} == {
        "autodl"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down_and_bounded(render: Render, overlay: str) -> None:
    for doc in render(K3S / "overlays" / overlay):
        if doc["kind"] not in WORKLOADS:
            continue
        pod = _pod(doc)
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["enableServiceLinks"] is False, where
        for container in _containers(pod):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{where} {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{where} {container['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where} {container['name']}"
            assert set(sc["capabilities"].get("add", [])) <= {"CHOWN"}, f"{where} {container['name']}"
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            if sc.get("runAsUser") == 0:
                # Only the agent's one-shot chown of its hostPath state dir may run as root.
                assert container["command"][0] == "chown", f"{where} {container['name']} runs as root"


def test_the_hub_autoscaler_owns_the_replica_count(render: Render) -> None:
    docs = render(K3S / "overlays" / "k3s")
    hpa = _find(docs, "HorizontalPodAutoscaler", "autodl-hub")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "autodl-hub"}
    assert "replicas" not in _find(docs, "Deployment", "autodl-hub")["spec"]
    # Several replicas need the shared database, not one SQLite file per pod.
    env = {e["name"]: e for e in _pod(_find(docs, "Deployment", "autodl-hub"))["containers"][0]["env"]}
    assert env["AUTODL_HUB_DATABASE_URL"]["value"].startswith("postgresql+psycopg://")
    names = list(env)
    assert names.index("AUTODL_POSTGRES_PASSWORD") < names.index("AUTODL_HUB_DATABASE_URL"), "$(VAR) needs order"


def test_hub_and_broker_share_the_hub_password_secret(render: Render) -> None:
    docs = render(K3S / "overlays" / "k3s")
    hub_env = {e["name"]: e for e in _pod(_find(docs, "Deployment", "autodl-hub"))["containers"][0]["env"]}
    broker = _pod(_find(docs, "Deployment", "autodl-mosquitto"))
    (init,) = broker["initContainers"]
    init_env = {e["name"]: e for e in init["env"]}
    ref = hub_env["AUTODL_HUB_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert init_env["AUTODL_HUB_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    hub_config = _find(docs, "ConfigMap", "autodl-hub")["data"]
    assert init_env["AUTODL_HUB_MQTT_USERNAME"]["value"] == hub_config["AUTODL_HUB_MQTT_USERNAME"]
    assert init["command"][:3] == ["python", "-m", "hub.broker.bootstrap"]
    conf = _find(docs, "ConfigMap", "autodl-mosquitto")["data"]["mosquitto.conf"]
    data_dir = init["command"][3]
    assert f"plugin_opt_config_file {data_dir}/dynamic-security.json" in conf
    assert "allow_anonymous false" in conf


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_names_in_manifests_exist(render: Render, overlay: str) -> None:
    hub_fields = set(HubSettings.model_fields)
    agent_fields = set(AgentSettings.model_fields)
    seen = 0
    for doc in render(K3S / "overlays" / overlay):
        names: list[str] = []
        if doc["kind"] == "ConfigMap":
            names = list(doc.get("data", {}))
        elif doc["kind"] in WORKLOADS:
            names = [e["name"] for c in _containers(_pod(doc)) for e in c.get("env", [])]
        for name in names:
            if name in AGENT_ENTRYPOINT_ENV:
                seen += 1
            elif name.startswith("AUTODL_HUB_"):
                assert name.removeprefix("AUTODL_HUB_").lower() in hub_fields, f"{name} is no hub setting"
                seen += 1
            elif name.startswith("AUTODL_AGENT_"):
                assert name.removeprefix("AUTODL_AGENT_").lower() in agent_fields, f"{name} is no agent setting"
                seen += 1
    assert seen > 10


def test_agent_daemonset_enrolls_from_a_secret_and_keeps_state_on_the_node(render: Render) -> None:
    docs = render(K3S / "overlays" / "k3s")
    pod = _pod(_find(docs, "DaemonSet", "autodl-agent"))
    assert pod["nodeSelector"] == {"autodl.io/agent": "true"}
    assert pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["enrollment"]["secret"]["secretName"] == "autodl-enrollment"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/autodl-agent"
    agent = pod["containers"][0]
    config = _find(docs, "ConfigMap", "autodl-agent")["data"]
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert config["AUTODL_AGENT_ENROLL_TOKEN_FILE"] == f"{mounts['enrollment']}/token"
    assert config["AUTODL_AGENT_STATE_DIR"] == mounts["state"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert agent["livenessProbe"]["httpGet"]["port"] == "http"
    assert {p["name"]: p["containerPort"] for p in agent["ports"]}["http"] == int(config["AUTODL_AGENT_PORT"])
    hub_url = config["AUTODL_HUB_URL"]
    assert hub_url == _find(docs, "ConfigMap", "autodl-hub")["data"]["AUTODL_HUB_PUBLIC_URL"]


def test_kubeedge_agents_run_on_edge_nodes_and_survive_disconnects(render: Render) -> None:
    docs = render(K3S / "overlays" / "kubeedge")
    pod = _pod(_find(docs, "DaemonSet", "autodl-agent"))
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    tolerations = {t["key"]: t for t in pod["tolerations"]}
    assert tolerations["node-role.kubernetes.io/edge"]["operator"] == "Exists"
    for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"):
        assert tolerations[key]["effect"] == "NoExecute"
        assert "tolerationSeconds" not in tolerations[key], "a disconnect must never evict the agent"
    assert pod["hostNetwork"] is True
    config = _find(docs, "ConfigMap", "autodl-agent")["data"]
    assert config["AUTODL_AGENT_HOST"] == "127.0.0.1"
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["host"] == "127.0.0.1"
    assert config["AUTODL_HUB_URL"] == _find(docs, "ConfigMap", "autodl-hub")["data"]["AUTODL_HUB_PUBLIC_URL"]
    assert ".svc" not in config["AUTODL_HUB_URL"], "edge nodes cannot resolve cluster Service names"
    for kind, name in [
        ("Deployment", "autodl-hub"),
        ("Deployment", "autodl-mosquitto"),
        ("StatefulSet", "autodl-postgres"),
    ]:
        terms = _pod(_find(docs, kind, name))["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        exprs = terms["nodeSelectorTerms"][0]["matchExpressions"]
        assert {"key": "node-role.kubernetes.io/edge", "operator": "DoesNotExist"} in exprs, name
    for name in ("autodl-hub", "autodl-mosquitto"):
        assert _find(docs, "Service", name)["spec"]["type"] == "LoadBalancer"


def test_gpu_agents_get_a_gpu_and_the_cuda_image(render: Render) -> None:
    docs = render(K3S / "overlays" / "gpu")
    pod = _pod(_find(docs, "DaemonSet", "autodl-agent"))
    assert pod["runtimeClassName"] == "nvidia"
    _find(docs, "RuntimeClass", "nvidia")
    agent = pod["containers"][0]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert agent["image"].endswith("-cuda")
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
