"""The local admin commands: init, key and token, on the hub's own data dir."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from hub.cli.main import app
from hub.config import HubSettings
from hub.main import create_app

runner = CliRunner()


def _cli(data_dir: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"AUTODL_HUB_DATA_DIR": str(data_dir)})
    return result.exit_code, result.output


def test_init_then_keys_and_tokens_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    code, out = _cli(data, "init", "--json")
    assert code == 0
    admin = json.loads(out)["admin_key"]
    assert admin.startswith("adk_") and (data / "signing_key.pem").stat().st_mode & 0o077 == 0
    code, again = _cli(data, "init")
    assert code == 0 and "admin key exists already" in again and "adk_" not in again

    code, out = _cli(data, "key", "create", "ops", "--role", "operator", "--json")
    operator = json.loads(out)
    code, out = _cli(data, "token", "create", "--max-uses", "3", "--expires-in", "2h", "--label", "site=x", "--json")
    token = json.loads(out)["token"]

    with TestClient(create_app(HubSettings(data_dir=data))) as client:
        auth = {"Authorization": f"Bearer {operator['key']}"}
        assert client.post("/models", headers=auth, json={"name": "m"}).status_code == 201
        assert client.post("/enroll", json={"token": token}).json()["labels"] == {"site": "x"}
        code, listed = _cli(data, "token", "list")
        assert "uses 1/3" in listed
        code, _ = _cli(data, "key", "revoke", str(operator["id"]))
        assert code == 0
        assert client.get("/models", headers=auth).status_code == 401
    code, listed = _cli(data, "key", "list")
    assert "ops\toperator\trevoked" in listed


def test_bad_input_on_the_command_line_is_one_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    _cli(data, "init")
    code, out = _cli(data, "token", "create", "--expires-in", "soon")
    assert code == 1 and "duration 'soon'" in out
    code, out = _cli(data, "key", "revoke", "999")
    assert code == 1 and "no API key 999" in out
    code, out = _cli(data, "key", "create", "x", "--rate-limit", "often")
    assert code == 1 and "rate limit" in out
