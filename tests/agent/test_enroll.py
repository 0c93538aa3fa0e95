"""Enrollment over real HTTP: identity stored 0600, re-enrollment refused unless --force."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentSettings, load_identity
from agent.enrollment import enroll
from agent.errors import AlreadyEnrolledError, EnrollmentError, HubUnavailableError, NotEnrolledError
from tests.support.hubstub import HubStub

CLI = [sys.executable, "-c", "from agent.cli import main; main()"]


def test_enroll_stores_a_private_identity_with_the_hub_key(settings: AgentSettings, hub_stub: HubStub) -> None:
    identity = enroll(settings, hub_stub.url, "good-token", name="cam-1", labels={"site": "a"})
    assert stat.S_IMODE(settings.identity_path.stat().st_mode) == 0o600
    assert load_identity(settings) == identity
    assert identity.device_id == "dev-1" and identity.hub_url == hub_stub.url
    sent = hub_stub.enrolled[0]
    assert sent.name == "cam-1" and sent.labels == {"site": "a"} and sent.profile.cores >= 1


def test_reenrolling_changes_nothing_unless_forced(settings: AgentSettings, hub_stub: HubStub) -> None:
    first = enroll(settings, hub_stub.url, "good-token")
    with pytest.raises(AlreadyEnrolledError, match="--force"):
        enroll(settings, hub_stub.url, "good-token")
    assert load_identity(settings) == first and len(hub_stub.enrolled) == 1
    second = enroll(settings, hub_stub.url, "good-token", force=True)
    assert second.device_id != first.device_id and load_identity(settings) == second


def test_a_refused_token_or_a_dead_hub_is_a_clear_error(settings: AgentSettings, hub_stub: HubStub) -> None:
    with pytest.raises(EnrollmentError, match="invalid enrollment token"):
        enroll(settings, hub_stub.url, "wrong")
    with pytest.raises(HubUnavailableError):
        enroll(settings, "http://127.0.0.1:1", "good-token")
    with pytest.raises(NotEnrolledError):
        load_identity(settings)


def test_cli_enroll_status_and_unenroll(tmp_state_dir: Path, hub_stub: HubStub) -> None:
    base = ["--state-dir", str(tmp_state_dir)]
    out = subprocess.run(
        [*CLI, "enroll", "--hub", hub_stub.url, "--token", "good-token", "--label", "site=x", *base],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "enrolled as dev-1" in out.stdout
    again = subprocess.run(
        [*CLI, "enroll", "--hub", hub_stub.url, "--token", "good-token", *base],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "already enrolled" in again.stderr
    status = subprocess.run([*CLI, "status", *base], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "dev-1" in status.stdout and "not running" in status.stdout
    gone = subprocess.run([*CLI, "unenroll", "--yes", *base], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0 and not (tmp_state_dir / "identity.json").exists()
    status = subprocess.run([*CLI, "status", *base], capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and "not enrolled" in status.stderr


@pytest.mark.parametrize(
    ("hub_url", "options", "message"),
    [
        ("http://hub.example:8080", {}, "plain HTTP beyond loopback"),
        ("http://127.0.0.1:9", {"ca_hash": "sha256:" + "0" * 64}, "is plain HTTP: use https://"),
        ("https://127.0.0.1:9", {"ca_hash": "sha256:abc"}, "sha256:<64 hex digits>"),
        ("ftp://hub.example", {}, "use https://"),
        ("http://127.0.0.1:9", {"device_cert": True}, "--device-cert needs an https:// hub"),
    ],
)
def test_enrollment_refuses_before_sending_anything(
    settings: AgentSettings, hub_url: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(EnrollmentError, match=message):
        enroll(settings, hub_url, "good-token", **options)  # type: ignore[arg-type]
    assert not settings.identity_path.exists()


def test_plain_http_beyond_loopback_is_allowed_when_said(tmp_path: Path) -> None:
    insecure = AgentSettings(state_dir=tmp_path, insecure=True, http_timeout_s=2)
    # Allowed: it goes on to the network (here: nothing listens on the reserved TEST-NET address).
    with pytest.raises(HubUnavailableError):
        enroll(insecure, "http://192.0.2.1:9", "good-token")
