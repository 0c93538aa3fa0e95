"""The agent image's entrypoint: enroll once from AUTODL_HUB_URL and a token file, then run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.entrypoint import EntrypointError, parse_labels
from tests.support.processes import free_port


def _entrypoint(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTODL_AGENT_", "AUTODL_HUB_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "agent.entrypoint", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_other_commands_pass_through_to_the_cli(tmp_path: Path) -> None:
    out = _entrypoint({"AUTODL_AGENT_STATE_DIR": str(tmp_path)}, "version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == __version__


def test_unenrolled_without_hub_url_fails_with_one_clear_line(tmp_path: Path) -> None:
    out = _entrypoint({"AUTODL_AGENT_STATE_DIR": str(tmp_path)})
    assert out.returncode == 1
    assert "AUTODL_HUB_URL is not set" in out.stderr
    assert "Traceback" not in out.stderr


def test_unenrolled_without_token_file_fails_with_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "secrets" / "token"
    env = {
        "AUTODL_AGENT_STATE_DIR": str(tmp_path / "state"),
        "AUTODL_HUB_URL": "http://127.0.0.1:9",
        "AUTODL_AGENT_ENROLL_TOKEN_FILE": str(missing),
    }
    out = _entrypoint(env)
    assert out.returncode == 1
    assert f"enrollment token file {missing} is unreadable" in out.stderr
    assert not (tmp_path / "state" / "identity.json").exists()


def test_unreachable_hub_is_retried_then_given_up(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("adl_et_whatever\n")
    env = {
        "AUTODL_AGENT_STATE_DIR": str(tmp_path / "state"),
        "AUTODL_HUB_URL": f"http://127.0.0.1:{free_port()}",
        "AUTODL_AGENT_ENROLL_TOKEN_FILE": str(token),
        "AUTODL_AGENT_ENROLL_ATTEMPTS": "3",
        "AUTODL_AGENT_ENROLL_BACKOFF_MIN_S": "0.01",
        "AUTODL_AGENT_ENROLL_BACKOFF_MAX_S": "0.02",
    }
    out = _entrypoint(env)
    assert out.returncode == 1
    assert out.stderr.count("retrying in") == 2, out.stderr
    assert "cannot reach the hub" in out.stderr


def test_labels_parse_and_bad_labels_are_refused() -> None:
    assert parse_labels("cluster=k3s, zone = a ,,") == {"cluster": "k3s", "zone": "a"}
    assert parse_labels("") == {}
    with pytest.raises(EntrypointError, match="is not k=v"):
        parse_labels("cluster")


def test_the_ca_pin_comes_from_the_environment(tmp_path: Path) -> None:
    from agent.entrypoint import plan_from_env

    pin = "sha256:" + "ab" * 32
    plan = plan_from_env({"AUTODL_HUB_URL": "https://hub:8080", "AUTODL_HUB_CA_HASH": f" {pin} "})
    assert plan.ca_hash == pin
    assert plan_from_env({"AUTODL_HUB_URL": "https://hub:8080"}).ca_hash is None
    assert plan_from_env({"AUTODL_HUB_URL": "https://hub:8080", "AUTODL_AGENT_ENROLL_DEVICE_CERT": "true"}).device_cert
    assert not plan_from_env({"AUTODL_HUB_URL": "https://hub:8080"}).device_cert
    # A plain-text hub beyond loopback is refused at once (not retried): the container says why.
    token = tmp_path / "token"
    token.write_text("aen_whatever\n")
    env = {
        "AUTODL_AGENT_STATE_DIR": str(tmp_path / "state"),
        "AUTODL_HUB_URL": "http://hub.example:8080",
        "AUTODL_AGENT_ENROLL_TOKEN_FILE": str(token),
    }
    out = _entrypoint(env)
    assert out.returncode == 1 and "plain HTTP beyond loopback" in out.stderr and "retrying" not in out.stderr
