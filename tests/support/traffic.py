"""`Traffic`: OIP v2 requests to agents from a background thread, as clients would send them.

with Traffic(agents, "clf") as traffic:
    ...                                     # swap versions, kill things
traffic.sent, traffic.failed, traffic.failures, traffic.versions
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import httpx

from tests.support.agent import AgentProcess, sample_request

__all__ = ["Traffic"]


class Traffic:
    """Sends the sample to every running agent in turn until stopped; counts answers and failures.

    `versions` holds every model version that answered, `failures` what went wrong (an HTTP
    error or a non-200 body); agents that are not running (`proc` is None) are skipped.
    """

    def __init__(self, agents: Sequence[AgentProcess], model: str, pause_s: float = 0.01) -> None:
        self.agents, self.model, self.pause_s = agents, model, pause_s
        self.sent = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    @property
    def failed(self) -> int:
        """Return how many requests failed."""
        return len(self.failures)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        body = sample_request()
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for agent in self.agents:
                    if agent.proc is None:
                        continue
                    self.sent += 1
                    try:
                        response = client.post(f"{agent.url}/v2/models/{self.model}/infer", json=body)
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{agent.device_id or agent.port}: {exc!r}")
                        continue
                    if response.status_code != 200:
                        self.failures.append(f"{agent.device_id or agent.port}: {response.text}")
                    else:
                        self.versions.add(response.json()["model_version"])
                self._stop.wait(self.pause_s)
