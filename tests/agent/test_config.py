"""Agent settings come from flags, then AUTODL_AGENT_* variables, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.cli import main
from agent.config import AgentSettings


def test_environment_fills_what_flags_leave_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODL_AGENT_PORT", "9100")
    monkeypatch.setenv("AUTODL_AGENT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AUTODL_AGENT_INTRA_OP_THREADS", "3")
    settings = AgentSettings(port=9200)
    assert settings.port == 9200  # the flag wins
    assert settings.state_dir == tmp_path and settings.intra_op_threads == 3
    assert settings.outbox_batch == 1000  # neither: the default


def test_a_bad_variable_is_an_error_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTODL_AGENT_OUTBOX_BATCH", "lots")
    with pytest.raises(ValidationError, match="outbox_batch"):
        AgentSettings()


def test_the_cli_reports_a_bad_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTODL_AGENT_PORT", "http")
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("error: bad settings (flags or AUTODL_AGENT_*): port: ")


def test_a_batching_override_from_the_desired_config_survives_a_restart(tmp_path: Path) -> None:
    import json

    from agent.actions import apply_config
    from agent.daemon import stored_config

    settings = AgentSettings(state_dir=tmp_path)
    applied = apply_config(settings, {"batching": {"digits": {"max_batch_size": 4, "max_queue_delay_us": 500}}})
    saved = json.dumps(stored_config(settings, applied))  # what the agent keeps in its store
    restarted = AgentSettings(state_dir=tmp_path)
    apply_config(restarted, json.loads(saved))
    assert restarted.batching["digits"].max_batch_size == 4
    assert restarted.batching["digits"].max_queue_delay_us == 500
