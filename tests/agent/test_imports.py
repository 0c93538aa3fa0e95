"""The agent must stay small: importing it, or running its CLI, never loads the hub's stack."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "sqlmodel", "sqlalchemy", "optimum", "hub")

PROBE = """
import sys, runpy
sys.argv = ["autodl-agent", "--help"]
import agent, agent.cli
try:
    agent.cli.main()
except SystemExit:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("LOADED", ",".join(loaded))
"""


def test_agent_and_its_cli_load_no_heavy_or_hub_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (FORBIDDEN,)], capture_output=True, text=True, check=True, timeout=120
    )
    assert "Usage" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED", out.stdout
