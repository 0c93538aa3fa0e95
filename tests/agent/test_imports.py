"""The agent must stay small: importing it, or running its CLI, never loads the hub's stack.

Nor what the agent was slimmed of (bench/footprint.py measures the result): a CLI
framework, a settings library, `cryptography` (the agent verifies with PyNaCl), psutil,
and Pillow, which loads only when an image request arrives; nor grpc unless a gRPC port is set;
nor OpenTelemetry unless the OTEL_* variables ask for traces.
"""

from __future__ import annotations

import os
import subprocess
import sys

HUB_STACK = ("torch", "transformers", "sqlmodel", "sqlalchemy", "optimum", "hub")
SLIMMED = ("typer", "click", "rich", "pydantic_settings", "cryptography", "psutil", "PIL", "grpc", "opentelemetry")
FORBIDDEN = HUB_STACK + SLIMMED

PROBE = """
import sys, runpy
sys.argv = ["autodl-agent", "--help"]
sys.modules.setdefault("httpx._main", None)  # as `autodl-agent run` does (httpx's own CLI)
import agent, agent.cli, agent.daemon
try:
    agent.cli.main()
except SystemExit:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("LOADED", ",".join(loaded))
"""


def test_agent_and_its_cli_load_no_heavy_or_hub_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (FORBIDDEN,)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    assert "usage: autodl-agent" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "LOADED", out.stdout
