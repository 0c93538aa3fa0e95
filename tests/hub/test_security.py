"""API keys: roles, revocation, rate limits; the token bucket itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.errors import RateLimitedError
from hub.security import RateLimiter
from tests.support.hub_app import Hub, make_hub


def test_requests_without_or_with_bad_credentials_are_401(hub: Hub) -> None:
    assert hub.client.get("/devices").status_code == 401
    response = hub.request("GET", "/devices", key="adk_not-a-key")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert hub.client.get("/healthz").status_code == 200  # health needs no key


def test_roles_viewer_reads_operator_deploys_admin_manages(hub: Hub) -> None:
    viewer, operator = hub.new_key("viewer"), hub.new_key("operator")

    assert hub.request("GET", "/models", key=viewer).status_code == 200
    assert hub.request("POST", "/models", key=viewer, json={"name": "m"}).status_code == 403
    assert hub.request("POST", "/models", key=operator, json={"name": "m"}).status_code == 201
    assert hub.request("POST", "/api-keys", key=operator, json={"name": "x", "role": "admin"}).status_code == 403
    assert hub.request("GET", "/audit", key=operator).status_code == 403
    actions = [e["action"] for e in hub.request("GET", "/audit").json()]
    assert "model.create" in actions and actions.count("api_key.create") == 3  # the admin, viewer and operator keys


def test_a_revoked_key_stops_working_at_once(hub: Hub) -> None:
    key = hub.new_key("viewer")
    assert hub.request("GET", "/models", key=key).status_code == 200
    listed = next(k for k in hub.request("GET", "/api-keys").json() if k["role"] == "viewer")
    key_id = listed["id"]
    assert listed["last_used_at"] is not None

    assert hub.request("DELETE", f"/api-keys/{key_id}").status_code == 200

    assert hub.request("GET", "/models", key=key).status_code == 401


def test_a_device_token_cannot_use_the_management_api(hub: Hub) -> None:
    device = hub.enrolled_device(name="d")
    token = device["device_token"]
    assert hub.request("GET", "/devices", key=token).status_code == 403
    assert hub.request("GET", f"/devices/{device['device_id']}", key=token).status_code == 200
    other = hub.enrolled_device(name="other")
    assert hub.request("GET", f"/devices/{other['device_id']}", key=token).status_code == 403


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    for hub in make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", rate_limit="5/hour"):
        key = hub.new_key("viewer")
        codes = [hub.request("GET", "/models", key=key).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        limited = hub.request("GET", "/models", key=key)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 3600
        # Limits are per key: another key still gets through.
        assert hub.request("GET", "/models", key=hub.new_key("viewer")).status_code == 200


def test_a_key_may_carry_its_own_limit(sqlite_hub: Hub) -> None:
    key = sqlite_hub.new_key("viewer", rate_limit="2/minute")
    codes = [sqlite_hub.request("GET", "/models", key=key).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_a_bad_rate_limit_is_a_422(sqlite_hub: Hub) -> None:
    body = {"name": "x", "role": "viewer", "rate_limit": "lots"}
    assert sqlite_hub.request("POST", "/api-keys", json=body).status_code == 422


def test_token_bucket_refills_over_time() -> None:
    limiter = RateLimiter()
    for _ in range(3):
        limiter.hit("k", 3, 60, now=0.0)
    with pytest.raises(RateLimitedError) as refused:
        limiter.hit("k", 3, 60, now=1.0)
    assert refused.value.retry_after == 19  # one token per 20 s, 1 s of it already elapsed
    limiter.hit("k", 3, 60, now=21.0)


def test_enrollment_attempts_are_limited_per_address(tmp_path: Path) -> None:
    for hub in make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", enroll_rate_limit="3/minute"):
        codes = [hub.enroll("aen_guess").status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        assert "retry-after" in hub.enroll("aen_guess").headers
