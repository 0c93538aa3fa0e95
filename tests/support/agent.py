"""`autodl-agent` as a real subprocess, with the one fast-timings preset every test uses.

agent = AgentProcess(tmp / "agent")
agent.enroll(hub.url, token)                # `autodl-agent enroll`; sets agent.device_id
agent.enroll(hub.url, token, "--ca-hash", hub.ca_hash)   # more `enroll` options after the token
agent.start().wait_live()                   # `autodl-agent run` on a free port
agent.serving("clf"), agent.infer("clf")    # what its local API serves, and its answer to SAMPLE_X
agent.kill9(); agent.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from tests.support.models import SAMPLE_X
from tests.support.processes import free_port, stop_process, wait_http_ready

__all__ = ["AGENT_CLI", "FAST", "AgentProcess", "sample_request"]

# The installed console script, as a user runs it; the module form where it is not installed.
_SCRIPT = Path(sys.executable).with_name("autodl-agent")
AGENT_CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "from agent.cli import main; main()"]

# Short backoffs, one ORT thread, small download blocks: tests wait on outcomes, not on timers.
FAST = {
    "AUTODL_AGENT_BACKOFF_MIN_S": "0.1",
    "AUTODL_AGENT_BACKOFF_MAX_S": "0.5",
    "AUTODL_AGENT_RETRY_MIN_S": "0.1",
    "AUTODL_AGENT_RETRY_MAX_S": "0.5",
    "AUTODL_AGENT_DISK_RESERVE_MB": "0",
    "AUTODL_AGENT_WARMUP_RUNS": "1",
    "AUTODL_AGENT_INTRA_OP_THREADS": "1",
    "AUTODL_AGENT_DOWNLOAD_CHUNK_BYTES": "4096",
    "AUTODL_AGENT_KEEPALIVE_S": "5",
}


def sample_request(x: np.ndarray = SAMPLE_X) -> dict[str, object]:
    """Return an OIP v2 JSON request with `x` as input "x"."""
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


class AgentProcess:
    """One `autodl-agent run` subprocess with its own state dir and local API port."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.env = {**os.environ, **FAST, **(env or {})}
        self.log_path = state_dir.parent / f"{state_dir.name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.device_id = ""

    @property
    def url(self) -> str:
        """Return the base URL of the agent's local API."""
        return f"http://127.0.0.1:{self.port}"

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``autodl-agent ARGS`` with this agent's environment (not checked)."""
        return subprocess.run([*AGENT_CLI, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def enroll(self, hub_url: str, token: str, *options: str) -> str:
        """Enroll with `autodl-agent enroll` (and `options`); return (and keep) the device id."""
        out = self.run_cli("enroll", "--hub", hub_url, "--token", token, "--state-dir", str(self.state_dir), *options)
        if out.returncode != 0:
            raise RuntimeError(f"autodl-agent enroll failed: {out.stderr or out.stdout}")
        self.device_id = out.stdout.split()[2]  # "enrolled as dev-... (hub ..."
        return self.device_id

    def start(self) -> AgentProcess:
        """Start `autodl-agent run` (not waiting: see `wait_live`)."""
        cmd = [*AGENT_CLI, "run", "--state-dir", str(self.state_dir), "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_live(self, timeout: float = 60) -> AgentProcess:
        """Wait until the local API answers ready; fail at once, with the log, if the agent exits."""
        assert self.proc is not None, "start() the agent first"
        wait_http_ready(f"{self.url}/v2/health/ready", self.proc, "the agent", timeout, lambda: self.log_tail())
        return self

    @property
    def running(self) -> bool:
        """Return True while the agent process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def serving(self, model: str) -> str | None:
        """Return the version of `model` the local API serves now (None while it serves none or is down)."""
        try:
            response = httpx.get(f"{self.url}/v2/models/{model}", timeout=5)
        except httpx.HTTPError:
            return None
        return str(response.json()["versions"][0]) if response.status_code == 200 else None

    def infer(self, model: str, x: np.ndarray = SAMPLE_X) -> tuple[str, np.ndarray]:
        """Run `x` through `model`; return the version that answered and its output."""
        response = httpx.post(f"{self.url}/v2/models/{model}/infer", json=sample_request(x), timeout=10)
        response.raise_for_status()
        out = response.json()
        return str(out["model_version"]), np.asarray(out["outputs"][0]["data"], np.float32).reshape(x.shape[0], -1)

    def log_tail(self, limit: int = 3000) -> str:
        """Return the end of the agent's log."""
        return self.log_path.read_text(errors="replace")[-limit:] if self.log_path.exists() else ""

    def kill9(self) -> None:
        """End the agent hard, as a power cut would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        """Stop the agent with SIGTERM; return its exit code (None when it was not running)."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, timeout)
