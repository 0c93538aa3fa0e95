"""The dashboard in process (the real app on SQLite, over HTTP): sign-in, roles, CSRF, every page, errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from hub.config import HubSettings
from hub.fleet.commands import list_commands
from hub.fleet.devices import enroll, get_device
from hub.main import create_app
from hub.models import Role, TelemetryPoint
from hub.rollouts.engine import create_rollout
from hub.rollouts.spec import AnalysisCriteria, RolloutSpec
from hub.security import create_api_key, create_enrollment_token, revoke_api_key
from hub.ui.views import charts_for
from shared.messages import EnrollRequest
from shared.targets import DeviceProfile
from tests.support.dashboard import publish_versions, ui_login
from tests.support.postgres import pg_schema_url

MODEL = "clf"


@dataclass
class Dash:
    client: TestClient
    settings: HubSettings
    viewer: str
    operator: str
    viewer_id: int
    device_id: str
    device_token: str
    rollout_id: str

    def session(self) -> Session:
        factory = self.client.app.state.session_factory  # type: ignore[attr-defined]
        session: Session = factory()
        return session

    def login(self, key: str, **fields: str) -> httpx.Response:
        """Post the sign-in form as a browser does: fetch it (token and cookie), then submit it."""
        return ui_login(self.client, key, **fields)

    def sign_in(self, key: str) -> str:
        """Sign in with `key`; return the CSRF token of the session."""
        response = self.login(key, next="/ui/")
        assert response.status_code == 303, response.text
        page = self.client.get("/ui/")
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert match, page.text
        return match.group(1)


@pytest.fixture
def dash(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dash]:
    """The app on SQLite, or on a fresh PostgreSQL schema with ``parametrize("dash", ["postgres"], indirect=True)``."""
    if getattr(request, "param", "sqlite") == "postgres":
        urls = pg_schema_url()
        yield from _dash(tmp_path, next(urls))
        urls.close()
    else:
        yield from _dash(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}")


def _dash(tmp_path: Path, database_url: str) -> Iterator[Dash]:
    settings = HubSettings(data_dir=tmp_path / "hub", public_url="http://hub.test", database_url=database_url)
    app = create_app(settings)
    with TestClient(app, base_url="http://hub.test") as client, app.state.session_factory() as session:
        viewer_row, viewer = create_api_key(session, "ann", Role.VIEWER, actor="test")
        operator = create_api_key(session, "olga", Role.OPERATOR, actor="test")[1]
        publish_versions(session, settings, MODEL, tmp_path / "files")
        token = create_enrollment_token(session, actor="test", max_uses=2)[1]
        enrolled = [
            enroll(
                session,
                settings,
                EnrollRequest(token=token, name=f"cam-{i}", labels={"site": "lab"}, profile=_profile()),
            )
            for i in range(2)
        ]
        device = get_device(session, enrolled[0].device_id)
        device.online = True
        device.reported = {
            "device_id": device.id,
            "revision": 1,
            "models": {MODEL: {"active": "1.0.0", "state": "committed", "updated_at": datetime.now(UTC).isoformat()}},
            "update_state": "committed",
        }
        session.add(device)
        session.commit()
        spec = RolloutSpec(
            model=MODEL, version="2.0.0", steps=[50, 100], analysis=AnalysisCriteria(min_observation_s=3600)
        )
        rollout = create_rollout(session, spec, actor="test")
        assert viewer_row.id is not None
        yield Dash(
            client,
            settings,
            viewer,
            operator,
            viewer_row.id,
            device.id,
            enrolled[0].device_token,
            rollout.id,
        )
    app.state.engine.dispose()


def _profile() -> DeviceProfile:
    return DeviceProfile(cores=2, memory_mb=1024)


def test_pages_send_a_visitor_without_a_session_to_sign_in(dash: Dash) -> None:
    response = dash.client.get("/ui/devices/x?tab=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=/ui/devices/x?tab=1"
    assert dash.client.get(f"/ui/api/devices/{dash.device_id}/telemetry").status_code == 401
    assert dash.client.post(f"/ui/rollouts/{dash.rollout_id}/pause", data={"csrf": "x"}).status_code == 401
    assert dash.client.get(f"/ui/rollouts/{dash.rollout_id}/live").status_code == 401
    assert dash.client.get("/ui/models/live", follow_redirects=False).status_code == 303  # a page, though named live


@pytest.mark.parametrize("which", ["wrong", "device"])
def test_sign_in_refuses_unknown_keys_and_device_tokens(dash: Dash, which: str) -> None:
    key = dash.device_token if which == "device" else "adk_not-a-key"
    response = dash.login(key)
    assert response.status_code == 401
    assert "autodl_session" not in response.cookies
    assert 'id="login-error"' in response.text


def test_session_cookie_is_httponly_strict_and_scoped_to_the_dashboard(dash: Dash) -> None:
    response = dash.login(dash.viewer)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie


def test_sign_in_never_redirects_off_the_dashboard(dash: Dash) -> None:
    for target in ("https://evil.example/", "//evil.example/ui", "/devices"):
        response = dash.login(dash.viewer, next=target)
        assert response.headers["location"] == "/ui/"


@pytest.mark.parametrize("dash", ["sqlite", "postgres"], indirect=True)
def test_every_page_renders_for_a_viewer(dash: Dash) -> None:
    dash.sign_in(dash.viewer)
    fleet = dash.client.get("/ui/")
    assert fleet.status_code == 200
    assert "script-src 'self'" in fleet.headers["content-security-policy"]
    assert 'id="count-total">2<' in fleet.text and 'id="count-online">1<' in fleet.text
    assert "site=lab" in fleet.text
    device = dash.client.get(f"/ui/devices/{dash.device_id}")
    assert device.status_code == 200 and "cam-0" in device.text
    assert 'id="read-only"' in device.text and 'id="command-form"' not in device.text
    models = dash.client.get(f"/ui/models/{MODEL}")
    assert models.status_code == 200
    assert "accuracy drop 0.031 &gt; 0.01" in models.text  # the skipped target's reason, escaped
    assert "0.934" in models.text and "stable → 1.0.0" in models.text
    rollout = dash.client.get(f"/ui/rollouts/{dash.rollout_id}")
    assert rollout.status_code == 200
    assert re.search(r'id="action-pause"[^>]*disabled', rollout.text)
    assert dash.client.get("/ui/rollouts").status_code == 200
    assert dash.client.get("/ui/models").status_code == 200
    assert dash.client.get("/ui/static/chart.js").status_code == 200


def test_viewer_actions_are_refused_and_change_nothing(dash: Dash) -> None:
    csrf = dash.sign_in(dash.viewer)
    pause = dash.client.post(f"/ui/rollouts/{dash.rollout_id}/pause", data={"csrf": csrf})
    assert pause.status_code == 403 and "operator" in pause.text
    command = dash.client.post(f"/ui/devices/{dash.device_id}/commands", data={"csrf": csrf, "name": "ping"})
    assert command.status_code == 403
    with dash.session() as session:
        assert list_commands(session, device_id=dash.device_id) == []
    assert "running" in dash.client.get(f"/ui/rollouts/{dash.rollout_id}/live").text


def test_forms_without_this_sessions_csrf_token_are_refused(dash: Dash) -> None:
    dash.sign_in(dash.operator)
    for data in ({"name": "ping"}, {"name": "ping", "csrf": "0" * 64}):
        response = dash.client.post(f"/ui/devices/{dash.device_id}/commands", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    with dash.session() as session:
        assert list_commands(session, device_id=dash.device_id) == []


def test_operator_sends_a_command_with_arguments(dash: Dash) -> None:
    csrf = dash.sign_in(dash.operator)
    data = {"csrf": csrf, "name": "set-config", "args": '{"log_level": "debug"}', "ttl_s": "60"}
    response = dash.client.post(f"/ui/devices/{dash.device_id}/commands", data=data, follow_redirects=False)
    assert response.status_code == 303
    with dash.session() as session:
        [row] = list_commands(session, device_id=dash.device_id)
    assert (row.name, row.args, row.created_by) == ("set-config", {"log_level": "debug"}, row.created_by)
    assert "olga" in row.created_by
    page = dash.client.get(f"/ui/devices/{dash.device_id}")
    assert f'data-command="{row.id}"' in page.text


@pytest.mark.parametrize("args", ["{not json", "[1, 2]"])
def test_command_arguments_that_are_not_a_json_object_get_a_clear_error(dash: Dash, args: str) -> None:
    csrf = dash.sign_in(dash.operator)
    data = {"csrf": csrf, "name": "ping", "args": args}
    response = dash.client.post(f"/ui/devices/{dash.device_id}/commands", data=data)
    assert response.status_code == 422
    assert "JSON" in response.text and "text/html" in response.headers["content-type"]


def test_unknown_things_get_an_html_404_and_the_api_keeps_json_errors(dash: Dash) -> None:
    dash.sign_in(dash.viewer)
    page = dash.client.get("/ui/devices/dev-nope")
    assert page.status_code == 404 and "no device" in page.text and "text/html" in page.headers["content-type"]
    api = dash.client.get("/devices/dev-nope", headers={"Authorization": f"Bearer {dash.viewer}"})
    assert api.status_code == 404 and api.json() == {"detail": "no device 'dev-nope'"}


def test_operator_pauses_and_resumes_a_rollout(dash: Dash) -> None:
    csrf = dash.sign_in(dash.operator)
    response = dash.client.post(f"/ui/rollouts/{dash.rollout_id}/pause", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    live = dash.client.get(f"/ui/rollouts/{dash.rollout_id}/live").text
    assert 'id="rollout-state">paused<' in live and 'id="action-resume"' in live
    again = dash.client.post(f"/ui/rollouts/{dash.rollout_id}/pause", data={"csrf": csrf})
    assert again.status_code == 409  # a paused rollout cannot be paused again
    dash.client.post(f"/ui/rollouts/{dash.rollout_id}/resume", data={"csrf": csrf})
    assert 'id="rollout-state">running<' in dash.client.get(f"/ui/rollouts/{dash.rollout_id}/live").text


def test_revoking_the_key_ends_its_dashboard_session(dash: Dash) -> None:
    dash.sign_in(dash.viewer)
    with dash.session() as session:
        revoke_api_key(session, dash.viewer_id, actor="test")
    response = dash.client.get("/ui/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")


def test_telemetry_endpoint_groups_points_into_charts(dash: Dash) -> None:
    now = datetime.now(UTC)
    with dash.session() as session:
        for seq, (name, value) in enumerate([("latency_p95_ms", 9.0), ("cpu_percent", 30.0), ("temp_c", 41.0)]):
            session.add(
                TelemetryPoint(
                    device_id=dash.device_id, seq=seq, ts=now, name=name, value=value, labels={"model": MODEL}
                )
            )
        session.add(  # older than the window: left out
            TelemetryPoint(device_id=dash.device_id, seq=9, ts=now - timedelta(hours=3), name="cpu_percent", value=1.0)
        )
        session.commit()
    dash.sign_in(dash.viewer)
    body = dash.client.get(f"/ui/api/devices/{dash.device_id}/telemetry?minutes=60").json()
    charts = {c["key"]: c for c in body["charts"]}
    assert list(charts) == ["latency", "cpu", "other:temp_c"]
    assert charts["latency"]["series"][0]["name"] == f"latency_p95_ms ({MODEL})"
    assert [p[1] for p in charts["cpu"]["series"][0]["points"]] == [30.0]


def test_chart_groups_follow_the_names_the_agent_publishes() -> None:
    now = datetime.now(UTC)
    names = [
        "memory_percent",
        "latency_p50_ms",
        "throughput_rps",
        "cpu_percent",
        "latency_p95_ms",
        "requests",
        "errors",
    ]
    points = [TelemetryPoint(device_id="d", seq=i, ts=now, name=n, value=1.0) for i, n in enumerate(names)]
    points += [
        TelemetryPoint(device_id="d", seq=10 + i, ts=now, name=n, value=1.0)
        for i, n in enumerate(["memory_used_bytes", "process_rss_bytes", "disk_free_bytes", "disk_used_percent"])
    ]
    charts = charts_for(points)
    assert [c.key for c in charts] == [
        "latency",
        "throughput",
        "requests",
        "cpu",
        "memory",
        "memory_percent",
        "other:disk_free_bytes",
        "other:disk_used_percent",
    ]
    assert sorted(charts[0].series) == ["latency_p50_ms", "latency_p95_ms"]
    assert sorted(charts[1].series) == ["throughput_rps"]
    assert sorted(charts[2].series) == ["errors", "requests"]
    assert sorted(charts[4].series) == ["memory_used_bytes", "process_rss_bytes"]
    # One unit per chart: bytes never share an axis with a percentage, nor a rate with a count.
    assert [c.unit for c in charts] == ["ms", "req/s", "count", "%", "bytes", "%", "bytes", "%"]


def test_logout_ends_the_session_on_the_server(dash: Dash) -> None:
    csrf = dash.sign_in(dash.viewer)
    cookie = dash.client.cookies.get("autodl_session")
    assert cookie and cookie != dash.viewer  # a random id, not the key
    assert dash.client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    # The same cookie, replayed after logout, opens nothing.
    dash.client.cookies.set("autodl_session", cookie, path="/ui")
    response = dash.client.get("/ui/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")


def test_sign_in_without_the_forms_token_is_refused(dash: Dash) -> None:
    dash.client.get("/ui/login")  # the cookie alone is not enough: the form's copy must match it
    response = dash.client.post("/ui/login", data={"key": dash.viewer, "csrf": "f" * 64}, follow_redirects=False)
    assert response.status_code == 403 and "autodl_session" not in response.cookies
    response = dash.client.post("/ui/login", data={"key": dash.viewer}, follow_redirects=False)
    assert response.status_code == 403


def test_the_labelling_page_shows_the_input_and_guess_and_labels_with_one_click(dash: Dash) -> None:
    import base64
    import io

    from PIL import Image

    from hub.datasets import store_batch
    from hub.models import CapturedItem
    from shared.capture import CaptureBatch, CaptureItem, CaptureReason, item_id

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buffer, format="PNG")
    body = ('{"image": "' + base64.b64encode(buffer.getvalue()).decode() + '"}').encode()
    item = CaptureItem(
        id=item_id(body, MODEL, "1.0.0"),
        model=MODEL,
        version="1.0.0",
        reason=CaptureReason.LOW_CONFIDENCE,
        content_b64=base64.b64encode(body).decode(),
        outputs={"top": [{"class": "b", "score": 0.4}]},
        captured_at=datetime.now(UTC),
    )
    with dash.session() as session:
        store_batch(
            session, dash.settings, dash.device_id, dash.device_id, CaptureBatch(device_id=dash.device_id, items=[item])
        )

    csrf = dash.sign_in(dash.viewer)
    page = dash.client.get(f"/ui/datasets/{MODEL}")
    assert page.status_code == 200
    assert 'src="data:image/png;base64,' in page.text and "guess <b" in page.text and item.id in page.text
    assert 'class="label-form' not in page.text  # a viewer sees, but gets no buttons
    refused = dash.client.post(f"/ui/datasets/{MODEL}/items/{item.id}/label", data={"csrf": csrf, "label": "a"})
    assert refused.status_code == 403

    csrf = dash.sign_in(dash.operator)
    page = dash.client.get(f"/ui/datasets/{MODEL}")
    assert 'class="row label-form"' in page.text
    no_csrf = dash.client.post(
        f"/ui/datasets/{MODEL}/items/{item.id}/label", data={"label": "a"}, follow_redirects=False
    )
    assert no_csrf.status_code == 403
    done = dash.client.post(
        f"/ui/datasets/{MODEL}/items/{item.id}/label", data={"csrf": csrf, "label": "a"}, follow_redirects=False
    )
    assert done.status_code == 303
    with dash.session() as session:
        row = session.get(CapturedItem, item.id)
        assert row is not None and row.label == "a" and row.labelled_by is not None
    assert item.id not in dash.client.get(f"/ui/datasets/{MODEL}").text  # the queue moves on
