"""Enrollment: tokens with limited uses and expiry, and who may create them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import select

from hub.broker.admin import BrokerAdmin
from hub.config import HubSettings
from hub.errors import AuthenticationError
from hub.fleet.devices import enroll
from hub.main import create_app
from hub.models import Device, EnrollmentToken, Rollout
from hub.security import create_enrollment_token
from shared.manifest import load_public_key
from shared.messages import EnrollRequest, EnrollResponse
from tests.support.hub_app import Hub
from tests.support.processes import free_port


def test_two_devices_enroll_with_a_two_use_token_and_a_third_is_refused(hub: Hub) -> None:
    token = hub.new_token(max_uses=2, labels={"site": "lab"})

    first = hub.enroll(token, name="cam-1", labels={"room": "a"})
    second = hub.enroll(token, name="cam-2")
    third = hub.enroll(token, name="cam-3")

    assert first.status_code == 200 and second.status_code == 200
    a, b = EnrollResponse.model_validate(first.json()), EnrollResponse.model_validate(second.json())
    assert a.device_id != b.device_id and a.device_token != b.device_token
    assert a.mqtt_username == a.device_id and a.mqtt_password
    assert a.labels == {"room": "a", "site": "lab"}  # the token's labels are applied
    load_public_key(a.signing_public_key)  # a usable Ed25519 key
    assert a.hub_url == "http://hub.test"
    assert third.status_code == 401
    devices = hub.request("GET", "/devices").json()
    assert sorted(d["name"] for d in devices) == ["cam-1", "cam-2"]


def test_every_bad_token_gets_the_same_401(hub: Hub) -> None:
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        _, expired = create_enrollment_token(session, actor="test", expires_in=timedelta(seconds=-1))
        row, revoked = create_enrollment_token(session, actor="test")
    assert hub.request("DELETE", f"/enrollment-tokens/{row.id}").status_code == 200
    used = hub.new_token(max_uses=1)
    assert hub.enroll(used).status_code == 200

    answers = [hub.enroll(t) for t in ("aen_unknown", expired, revoked, used)]

    assert [r.status_code for r in answers] == [401] * 4
    assert len({r.text for r in answers}) == 1  # nothing says which case it was
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert len(session.exec(select(Device)).all()) == 1


def test_a_viewer_or_operator_cannot_create_an_enrollment_token(hub: Hub) -> None:
    for role in ("viewer", "operator"):
        key = hub.new_key(role)
        response = hub.request("POST", "/enrollment-tokens", key=key, json={"max_uses": 1})
        assert response.status_code == 403, role
    assert hub.request("GET", "/enrollment-tokens").json() == []


def test_malformed_enrollment_is_a_422_with_the_field(hub: Hub) -> None:
    response = hub.client.post("/enroll", json={"token": "x", "profile": {"cores": "many"}})
    assert response.status_code == 422
    assert any(err["loc"][-1] == "cores" for err in response.json()["detail"])


def test_devices_racing_for_the_last_use_of_a_token_get_one_enrollment(hub: Hub) -> None:
    token = hub.new_token(max_uses=1)
    factory = hub.client.app.state.session_factory  # type: ignore[attr-defined]
    start = threading.Barrier(4)

    def attempt(name: str) -> str:
        start.wait()
        with factory() as session:
            try:
                return enroll(session, hub.settings, EnrollRequest(token=token, name=name)).device_id
            except AuthenticationError:
                return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(attempt, ["a", "b", "c", "d"]))

    assert outcomes.count("refused") == 3
    with factory() as session:
        assert len(session.exec(select(Device)).all()) == 1


def test_enrollment_fails_whole_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path / "data")
    broker = BrokerAdmin(f"mqtt://127.0.0.1:{free_port()}", "autodl-hub", "pw", timeout=1)
    app = create_app(settings, broker_admin=broker)
    with app.state.session_factory() as session:
        row, token = create_enrollment_token(session, actor="test")
    with TestClient(app) as client:
        response = client.post("/enroll", json={"token": token})
    broker.close()

    assert response.status_code == 503
    with app.state.session_factory() as session:
        assert session.exec(select(Device)).all() == []
        refreshed = session.get(EnrollmentToken, row.id)
        assert refreshed is not None and refreshed.uses == 0  # the device may try again


def test_a_label_key_a_rollout_selects_on_is_protected_from_then_on(hub: Hub) -> None:
    token = hub.new_token(max_uses=3)
    assert hub.enroll(token, labels={"zone": "z1"}).status_code == 200
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        spec = {"selector": {"labels": {"zone": "z1"}}}
        session.add(Rollout(id="r-zone", model="m", version="1.0.0", spec=spec, state="running"))
        session.commit()
    refused = hub.enroll(token, labels={"zone": "z1"})
    assert refused.status_code == 403 and "zone" in refused.json()["detail"]
    assert hub.enroll(token, labels={"room": "a"}).status_code == 200


def test_a_certificate_request_gets_a_device_certificate_where_the_broker_has_a_certificate_listener(
    hub: Hub, tmp_path: Path
) -> None:
    from contextlib import contextmanager

    from cryptography import x509

    from agent.tls import DeviceKey
    from tests.support.hub_app import make_hub

    settings: HubSettings = hub.client.app.state.settings  # type: ignore[attr-defined]
    assert settings.mtls_port is not None  # TLS on (not loopback), embedded broker
    answer = hub.enrolled_device(csr=DeviceKey().csr_pem())
    certificate = x509.load_pem_x509_certificate(answer["device_certificate"].encode())
    assert certificate.subject.rfc4514_string() == f"CN={answer['device_id']}"
    assert answer["mqtt_port"] == settings.mtls_port and answer["mqtt_tls"] is True

    token = hub.new_token()
    assert (
        hub.enroll(
            token, csr="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        ).status_code
        == 422
    )
    assert hub.enroll(token).status_code == 200  # the refused request did not spend the token

    with contextmanager(make_hub)(tmp_path / "plain", f"sqlite:///{tmp_path / 'plain.db'}", insecure=True) as plain:
        token = plain.new_token()
        refused = plain.enroll(token, csr=DeviceKey().csr_pem())
        assert refused.status_code == 409 and "no device certificates" in refused.text
        assert plain.enroll(token).status_code == 200
