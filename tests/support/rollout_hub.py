"""A real hub app on a real database for rollout tests: keys, enrolled devices, published versions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import select

from hub.config import HubSettings
from hub.db import create_engine_for, migrate, session_factory
from hub.main import create_app
from hub.messaging.session import HubMessaging
from hub.models import Device, Role
from hub.registry import publish_version
from hub.rollouts.controller import RolloutController
from hub.security import create_api_key, create_enrollment_token, load_or_create_signing_key
from shared.messages import ModelStatus, ReportedState, UpdateState
from tests.support.models import make_release, write_files

MODEL = "clf"
OLD, NEW = "1.0.0", "2.0.0"


class RolloutHub:
    """The hub app (no lifespan: tests drive the controller with `tick()`), with operator and viewer keys."""

    def __init__(self, tmp: Path, database_url: str = "", mqtt_url: str | None = None) -> None:
        self.tmp = tmp
        self.settings = HubSettings(
            data_dir=tmp / "hub", database_url=database_url, port=8080, telemetry_flush_s=0.1, heartbeat_timeout_s=600
        )
        engine = create_engine_for(self.settings)
        migrate(engine)
        self.messaging: HubMessaging | None = None
        if mqtt_url is not None:
            self.messaging = HubMessaging(self.settings, session_factory(engine), url=mqtt_url, password=None)
            self.messaging.start()
            assert self.messaging.wait_connected(10)
        self.app = create_app(self.settings, self.messaging, engine=engine)
        self.client = TestClient(self.app)
        self.sessions = self.app.state.session_factory
        with self.sessions() as session:
            self.operator = create_api_key(session, "op", Role.OPERATOR, actor="test")[1]
            self.viewer = create_api_key(session, "view", Role.VIEWER, actor="test")[1]

    def close(self) -> None:
        """Stop messaging and release the database, as a stopping hub does."""
        if self.messaging is not None:
            self.messaging.stop()
        self.app.state.engine.dispose()

    @property
    def controller(self) -> RolloutController:
        controller: RolloutController = self.app.state.rollout_controller
        return controller

    def headers(self, role: str = "operator") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator if role == 'operator' else self.viewer}"}

    def publish(self, version: str, seed: int, **kwargs: Any) -> None:
        """Publish a real (tiny ONNX) version of MODEL."""
        key = load_or_create_signing_key(self.settings.signing_key)
        release = make_release(key, MODEL, version, seed, **kwargs)
        with self.sessions() as session:
            publish_version(session, self.settings, release.manifest, write_files(release, self.tmp / f"v{version}"))

    def enroll(self, n: int, labels: Mapping[str, str] | None = None) -> list[str]:
        """Enroll `n` devices through POST /enroll; return their ids."""
        with self.sessions() as session:
            secret = create_enrollment_token(session, actor="test", max_uses=n, labels=dict(labels or {}))[1]
        ids = []
        for i in range(n):
            response = self.client.post("/enroll", json={"token": secret, "name": f"d{i}"})
            assert response.status_code == 200, response.text
            ids.append(response.json()["device_id"])
        return ids

    def deploy(self, device_id: str, version: str) -> None:
        response = self.client.put(
            f"/devices/{device_id}/models/{MODEL}", json={"version": version}, headers=self.headers()
        )
        assert response.status_code == 200, response.text

    def desired(self, device_id: str) -> str | None:
        with self.sessions() as session:
            device = session.get(Device, device_id)
            assert device is not None
            return ((device.desired or {}).get("models") or {}).get(MODEL, {}).get("version")

    def revision(self, device_id: str) -> int:
        with self.sessions() as session:
            device = session.get(Device, device_id)
            assert device is not None
            return int((device.desired or {}).get("revision", 0))

    def report(
        self,
        device_id: str,
        active: str | None,
        *,
        state: UpdateState = UpdateState.COMMITTED,
        error: str | None = None,
        online: bool = True,
    ) -> None:
        """Store a device's ReportedState as the MQTT ingest would (DB-only tests)."""
        desired = self.desired(device_id)
        reported = ReportedState(
            device_id=device_id,
            revision=self.revision(device_id),
            models={MODEL: ModelStatus(active=active, desired=desired, state=state, error=error)},
        )
        with self.sessions() as session:
            device = session.get(Device, device_id)
            assert device is not None
            device.reported, device.online = reported.model_dump(mode="json"), online
            session.add(device)
            session.commit()

    def converge(
        self, device_ids: list[str], *, fail: frozenset[str] | set[str] = frozenset(), error: str = "smoke test failed"
    ) -> None:
        """Make each device report what it is told to run (or, for `fail`, a rollback)."""
        for device_id in device_ids:
            want = self.desired(device_id)
            if device_id in fail and want == NEW:
                self.report(device_id, OLD, state=UpdateState.ROLLED_BACK, error=error)
            else:
                self.report(device_id, want)

    def all_devices(self) -> list[str]:
        with self.sessions() as session:
            return [d.id for d in session.exec(select(Device))]


def spec(**overrides: Any) -> dict[str, Any]:
    """A rollout body: canary 20/50/100, no observation wait."""
    body: dict[str, Any] = {
        "model": MODEL,
        "version": NEW,
        "selector": {"all": True},
        "strategy": "canary",
        "steps": [20, 50, 100],
        "analysis": {"min_observation_s": 0, "min_devices_reporting": 1, "update_timeout_s": 600},
    }
    body.update(overrides)
    return body
