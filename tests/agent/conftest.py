"""Fixtures for agent tests: a hub stand-in over real HTTP, settings in a temp state dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.artifacts import ArtifactCache
from agent.config import AgentSettings, Identity, save_identity
from agent.enrollment import enroll
from tests.support.hubstub import DEVICE_TOKEN, HubStub
from tests.support.mqtt import Watcher
from tests.support.processes import Broker


@pytest.fixture
def hub_stub() -> Iterator[HubStub]:
    hub = HubStub().start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def settings(tmp_state_dir: Path) -> AgentSettings:
    return AgentSettings(
        state_dir=tmp_state_dir,
        port=0,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
        retry_min_s=0.05,
        retry_max_s=0.2,
        disk_reserve_mb=0,
        download_chunk_bytes=4096,
        warmup_runs=1,
        intra_op_threads=1,
    )


@pytest.fixture
def identity(settings: AgentSettings, hub_stub: HubStub) -> Identity:
    ident = Identity.from_response(hub_stub.enroll_response("dev-test"), "test")
    save_identity(settings, ident)
    return ident


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"Authorization": f"Bearer {DEVICE_TOKEN}"}, timeout=10) as c:
        yield c


@pytest.fixture
def cache(settings: AgentSettings) -> ArtifactCache:
    return ArtifactCache(settings.cache_dir, chunk_bytes=4096, reserve_mb=0)


@pytest.fixture
def enrolled(tmp_state_dir: Path, hub_stub: HubStub, mqtt_broker: Broker) -> str:
    """The device id of an agent enrolled with the hub stand-in, pointed at the test's broker."""
    hub_stub.mqtt_host, hub_stub.mqtt_port = mqtt_broker.host, mqtt_broker.port
    return enroll(AgentSettings(state_dir=tmp_state_dir), hub_stub.url, "good-token").device_id


@pytest.fixture
def watcher(mqtt_broker: Broker) -> Iterator[Watcher]:
    """Every reported state and presence message on the test's broker."""
    w = Watcher(mqtt_broker.host, mqtt_broker.port)
    try:
        yield w
    finally:
        w.close()
