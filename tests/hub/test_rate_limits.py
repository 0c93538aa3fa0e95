"""Rate limits that hold, against real hub processes: device tokens are limited, X-Forwarded-For is not a way around."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.hub import HubProcess

pytestmark = [pytest.mark.e2e]


def _enroll_codes(hub: HubProcess, n: int) -> list[int]:
    return [
        httpx.post(
            f"{hub.url}/enroll", json={"token": "aen_guess"}, headers={"X-Forwarded-For": f"10.0.0.{i}"}, timeout=10
        ).status_code
        for i in range(n)
    ]


def test_forwarded_for_from_an_untrusted_peer_does_not_reset_the_enroll_limit(tmp_path: Path) -> None:
    env = {"AUTODL_HUB_ENROLL_RATE_LIMIT": "3/minute", "AUTODL_HUB_DEVICE_RATE_LIMIT": "3/minute"}
    with HubProcess(tmp_path / "hub", mqtt=False, env=env) as hub:
        token = hub.enrollment_token()
        device = httpx.post(f"{hub.url}/enroll", json={"token": token}, headers={"X-Forwarded-For": "10.9.9.9"})
        assert device.status_code == 200, device.text
        # Each attempt claims another address; the hub counts them all against the real peer.
        assert _enroll_codes(hub, 3) == [401, 401, 429]

        # A device token is limited like an API key.
        headers = {"Authorization": f"Bearer {device.json()['device_token']}"}
        codes = [
            httpx.get(f"{hub.url}/artifacts/{'0' * 64}", headers=headers, timeout=10).status_code for _ in range(4)
        ]
        assert 429 not in codes[:3] and codes[3] == 429


def test_forwarded_for_from_a_trusted_proxy_is_the_client_address(tmp_path: Path) -> None:
    env = {"AUTODL_HUB_ENROLL_RATE_LIMIT": "3/minute", "AUTODL_HUB_TRUSTED_PROXIES": json.dumps(["127.0.0.1"])}
    with HubProcess(tmp_path / "hub", mqtt=False, env=env) as hub:
        assert _enroll_codes(hub, 5) == [401] * 5  # five clients behind the proxy, one attempt each
