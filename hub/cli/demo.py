"""``autodl-hub demo``: the whole loop on one machine, in one command.

It starts a hub (SQLite, local artifacts, its own mosquitto) as a child process, trains
the digits example twice (a baseline and a candidate), enrolls two local agents with
different labels, deploys the baseline, rolls the candidate out as a canary, sends
inference requests to an agent and prints a summary. Every child runs in its own
session, so Ctrl-C reaches only this process, which then stops the children in order
(agents, then the hub, which stops its broker). SIGTERM (what a container runtime or
systemd sends) does the same as Ctrl-C.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["demo"]

MODEL = "digits"
_TASK = """\
# The digits example (examples/digits/task.yaml) cut down so the demo trains in seconds.
task: image-classification
data:
  path: builtin:digits
  validation_split: 0.2
model:
  candidates: [cnn-small]
search:
  strategy: random
  trials: 1
  cv_folds: 2
  metric: accuracy
training:
  epochs: {epochs}
  batch_size: 64
  seed: {seed}
resource:
  use_gpu: false
  threads: 2
build:
  targets: [cpu-fp32]
publish:
  model: digits
  version: auto
"""
LM_MODEL = "stdlib-code"
# A code-completion model beside the digits one (examples/code-completion/task.yaml cut down so
# it trains and builds in well under a minute): the standard library's source, one tiny Qwen2,
# exported as int4 (and the fp32 baseline the gate compares it with).
_LM_TASK = """\
task: text-generation
data:
  path: builtin:python-stdlib
  extensions: [.py]
  max_bytes: 400000
  max_line_length: 400
  validation_split: 0.05
model:
  candidates: [qwen2]
  auto_select: false
  vocab_size: 1024
  max_length: 64
training:
  batch_size: 8
  lr: 0.004
  max_steps: {steps}
  seed: 0
resource:
  threads: 2
generation:
  context_length: 256
  max_new_tokens: 32
  temperature: 0.0
  sample_prompts: ["def __init__(self):\\n"]
build:
  targets: [cpu-int4]
  parity_tokens: 8
publish:
  model: stdlib-code
  version: auto
"""
LM_PROMPT = "import os\n\n\ndef "
AGENTS = (("edge-a", {"site": "demo", "ring": "canary"}), ("edge-b", {"site": "demo", "ring": "stable"}))


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _script(name: str, module: str) -> list[str]:
    """Return the command for console script `name`, next to this interpreter when installed."""
    path = Path(sys.executable).with_name(name)
    return [str(path)] if path.exists() else [sys.executable, "-c", f"from {module} import main; main()"]


@dataclass
class Children:
    """Child processes started by the demo; `stop_all` ends them newest first."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start `args` in its own session with output to `log`."""
        with log.open("ab") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        """Return the names of children that exited."""
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM every child (newest first), SIGKILL what is still alive after `timeout`."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _wait(what: str, check: Callable[[], Any], timeout: float, children: Children) -> Any:
    """Poll `check` until it returns something truthy; fail if a child dies or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dead := children.dead():
            raise DemoError(f"{', '.join(dead)} exited while waiting for {what}")
        try:
            if value := check():
                return value
        except httpx.HTTPError:
            pass  # still starting
        time.sleep(0.3)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Demo:
    """One run of the demo in `data_dir`."""

    data_dir: Path
    epochs: int
    requests: int
    say: Callable[[str], None]
    lm_steps: int = 60
    children: Children = field(default_factory=Children)
    port: int = field(default_factory=_free_port)
    mqtt_port: int = field(default_factory=_free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AUTODL_HUB_DATA_DIR": str(self.data_dir / "hub"),
            "AUTODL_HUB_HOST": "127.0.0.1",
            "AUTODL_HUB_PORT": str(self.port),
            "AUTODL_HUB_PUBLIC_URL": self.url,
            "AUTODL_HUB_MQTT_PORT": str(self.mqtt_port),
            "AUTODL_HUB_MQTT_PUBLIC_HOST": "127.0.0.1",
            "AUTODL_HUB_TELEMETRY_FLUSH_S": "0.5",
        }

    def agent_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AUTODL_AGENT_TELEMETRY_INTERVAL_S": "1",
            "AUTODL_AGENT_BACKOFF_MIN_S": "0.2",
            "AUTODL_AGENT_BACKOFF_MAX_S": "2",
            "AUTODL_AGENT_RETRY_MIN_S": "0.2",
            "AUTODL_AGENT_RETRY_MAX_S": "2",
            "AUTODL_AGENT_INTRA_OP_THREADS": "1",
        }

    def run_cli(self, name: str, args: list[str], env: dict[str, str], timeout: float = 900) -> str:
        """Run a short-lived CLI as a tracked child; return its stdout."""
        log = self.data_dir / f"{name}.log"
        out = self.data_dir / f"{name}.out"
        with out.open("wb") as stdout, log.open("ab") as stderr:
            proc = subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
            self.children.procs.append((name, proc))
            try:
                code = proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                self.children.procs.remove((name, proc))
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise DemoError(f"{' '.join(args[-3:])} failed ({code}):\n{tail}")
        return out.read_text()

    def hub_cli(self, name: str, *args: str) -> str:
        return self.run_cli(name, [*_script("autodl-hub", "hub.cli.main"), *args], self.env())

    def api(self, key: str, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        response = httpx.request(
            method, self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
        )
        if response.status_code >= 400:
            raise DemoError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def run(self) -> dict[str, Any]:
        """Do every step; return the summary."""
        started = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        init = json.loads(self.hub_cli("init", "init", "--json").strip().splitlines()[-1])
        key = (
            init["admin_key"]
            or json.loads(self.hub_cli("key", "key", "create", "demo", "--role", "admin", "--json"))["key"]
        )
        versions = [self.train(seed=0, epochs=max(1, self.epochs - 1)), self.train(seed=1, epochs=self.epochs)]
        baseline, candidate = versions
        self.say(f"registered {MODEL} {baseline} (baseline) and {candidate} (candidate)")
        lm_version = self.train_lm() if self.lm_steps else None

        hub = [*_script("autodl-hub", "hub.cli.main"), "serve", "--log-level", "warning"]
        self.children.spawn("hub", hub, self.env(), self.data_dir / "hub.log")
        _wait("the hub", lambda: self._ready(f"{self.url}/readyz"), 90, self.children)
        self.say(f"hub ready at {self.url} (mosquitto on 127.0.0.1:{self.mqtt_port})")

        agents = [self.start_agent(key, name, labels) for name, labels in AGENTS]
        for agent in agents:
            self.api(key, "PUT", f"/devices/{agent.device_id}/models/{MODEL}", json={"version": baseline})
            if lm_version is not None:
                self.api(key, "PUT", f"/devices/{agent.device_id}/models/{LM_MODEL}", json={"version": lm_version})
        for agent in agents:
            _wait(f"{agent.name} to serve {baseline}", functools.partial(agent.serves, baseline), 180, self.children)
            if lm_version is not None:
                serves_lm = functools.partial(agent.serves, lm_version, LM_MODEL)
                _wait(f"{agent.name} to serve {LM_MODEL} {lm_version}", serves_lm, 180, self.children)
        self.say(f"both agents serve {MODEL} {baseline}" + (f" and {LM_MODEL} {lm_version}" if lm_version else ""))

        rollout = self.rollout(key, candidate, agents)
        self.say(f"rollout {rollout['id']}: {rollout['state']}")

        latency = self.infer(agents[0])
        completion = agents[1].stream_completion(LM_PROMPT, 32) if lm_version is not None else None
        if completion is not None:
            self.say(
                f"streamed {completion['tokens']} tokens of {LM_MODEL} from {agents[1].name}: "
                f"first after {completion['ttft_ms']} ms"
            )
        points = _wait("telemetry from both agents", lambda: self._telemetry(key, agents), 60, self.children)
        return {
            "hub_url": self.url,
            "docs_url": f"{self.url}/docs",
            "ui_url": f"{self.url}/ui",
            "admin_key": key,
            "data_dir": str(self.data_dir),
            "model": MODEL,
            "versions": versions,
            "rollout": {
                "id": rollout["id"],
                "state": rollout["state"],
                "reason": rollout["reason"],
                "steps": rollout["steps"],
                "events": [e["message"] for e in rollout["events"] if e["kind"] == "moved"],
            },
            "devices": [
                {"name": a.name, "device_id": a.device_id, "labels": a.labels, "serving": a.serving(), "port": a.port}
                for a in agents
            ],
            "inference": latency,
            "lm_version": lm_version,
            "completion": completion,
            "telemetry_points": points,
            "elapsed_s": round(time.monotonic() - started, 1),
        }

    def train(self, seed: int, epochs: int) -> str:
        task = self.data_dir / f"digits-seed{seed}.yaml"
        task.write_text(_TASK.format(epochs=epochs, seed=seed))
        self.say(f"training {MODEL} (seed {seed}, {epochs} epochs) ...")
        out = self.hub_cli(f"train-{seed}", "train", str(task), "--json")
        summary = json.loads(out.strip().splitlines()[-1])
        self.say(f"  {MODEL} {summary['version']}: test accuracy {summary['test_metric']:.3f}")
        version: str = summary["version"]
        return version

    def train_lm(self) -> str:
        task = self.data_dir / "stdlib-code.yaml"
        task.write_text(_LM_TASK.format(steps=self.lm_steps))
        self.say(f"training {LM_MODEL} on the Python standard library ({self.lm_steps} steps), int4 build ...")
        out = self.hub_cli("train-lm", "train", str(task), "--json")
        summary = json.loads(out.strip().splitlines()[-1])
        self.say(
            f"  {LM_MODEL} {summary['version']}: validation perplexity {summary['test_metric']:.1f} "
            f"(unigram {summary['baseline']:.1f}), published {', '.join(summary['published_targets'])}"
        )
        version: str = summary["version"]
        return version

    def start_agent(self, key: str, name: str, labels: dict[str, str]) -> DemoAgent:
        # The operator labels the device through its token: a device may not put itself in a ring.
        token = self.api(key, "POST", "/enrollment-tokens", json={"max_uses": 1, "labels": labels})["token"]
        agent = DemoAgent(name=name, labels=labels, state_dir=self.data_dir / name, port=_free_port())
        cli = _script("autodl-agent", "agent.cli")
        args = [
            *cli,
            "enroll",
            "--hub",
            self.url,
            "--token",
            token,
            "--name",
            name,
            "--state-dir",
            str(agent.state_dir),
        ]
        out = self.run_cli(f"enroll-{name}", args, self.agent_env(), timeout=60)
        agent.device_id = out.split()[2]  # "enrolled as dev-... (hub ...)"
        run = [*cli, "run", "--state-dir", str(agent.state_dir), "--port", str(agent.port)]
        self.children.spawn(name, run, self.agent_env(), self.data_dir / f"{name}.log")
        _wait(f"agent {name}", lambda: self._ready(f"{agent.url}/v2/health/live"), 60, self.children)
        self.say(f"agent {name} enrolled as {agent.device_id} {labels}, local API {agent.url}")
        return agent

    def rollout(self, key: str, version: str, agents: list[DemoAgent]) -> dict[str, Any]:
        body = {
            "model": MODEL,
            "version": version,
            "selector": {"labels": {"site": "demo"}},
            "steps": [50, 100],
            "analysis": {"min_observation_s": 3, "min_devices_reporting": 1, "update_timeout_s": 180},
        }
        rollout_id = self.api(key, "POST", "/rollouts", json=body)["id"]
        self.say(f"canary rollout {rollout_id}: {MODEL} -> {version}, steps 50% then 100%")

        def done() -> dict[str, Any] | None:
            for agent in agents:  # live traffic, so the analysis compares real serving telemetry
                agent.predict(_digit_images(2))
            detail: dict[str, Any] = self.api(key, "GET", f"/rollouts/{rollout_id}")
            return detail if detail["state"] in ("succeeded", "failed", "aborted") else None

        detail: dict[str, Any] = _wait("the rollout", done, 300, self.children)
        return detail

    def infer(self, agent: DemoAgent) -> dict[str, Any]:
        images, labels = _digits(self.requests)
        timings: list[float] = []
        correct = 0
        version = None
        for image, label in zip(images, labels, strict=True):
            t0 = time.perf_counter()
            answer = agent.predict([image])
            timings.append((time.perf_counter() - t0) * 1000)
            version = answer["model_version"]
            top = answer["predictions"][0]
            correct += (top[0] if isinstance(top, list) else top)["label"] == str(label)
        timings.sort()
        result = {
            "agent": agent.name,
            "requests": len(timings),
            "model_version": version,
            "accuracy": round(correct / max(1, len(timings)), 3),
            "p50_ms": round(timings[len(timings) // 2], 2),
            "p95_ms": round(timings[min(len(timings) - 1, int(len(timings) * 0.95))], 2),
        }
        self.say(f"{len(timings)} inference requests to {agent.name}: p50 {result['p50_ms']} ms")
        return result

    def _telemetry(self, key: str, agents: list[DemoAgent]) -> int | None:
        counts = [
            len(self.api(key, "GET", "/telemetry", params={"device_id": a.device_id, "limit": 100_000})["points"])
            for a in agents
        ]
        return sum(counts) if all(counts) else None

    @staticmethod
    def _ready(url: str) -> bool:
        import httpx

        return httpx.get(url, timeout=2).status_code == 200


@dataclass
class DemoAgent:
    """One local `autodl-agent run`."""

    name: str
    labels: dict[str, str]
    state_dir: Path
    port: int
    device_id: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serving(self, model: str = MODEL) -> str | None:
        import httpx

        response = httpx.get(f"{self.url}/v1/models", timeout=5)
        if response.status_code != 200:
            return None
        return next((str(m["version"]) for m in response.json()["models"] if m["name"] == model), None)

    def serves(self, version: str, model: str = MODEL) -> bool:
        """Return True when the local API serves `version` of `model`."""
        return self.serving(model) == version

    def stream_completion(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """Stream one completion from the agent's OpenAI-compatible API (SSE); return text and timings."""
        import httpx

        body = {"model": LM_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        pieces: list[str] = []
        first: float | None = None
        started = time.perf_counter()
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
            if response.status_code != 200:
                raise DemoError(f"{self.name} /v1/completions: {response.status_code} {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    if choice.get("text"):
                        first = first if first is not None else time.perf_counter()
                        pieces.append(choice["text"])
        elapsed = time.perf_counter() - started
        ttft = (first - started) if first is not None else elapsed
        return {
            "agent": self.name,
            "prompt": prompt,
            "text": "".join(pieces),
            "tokens": len(pieces),
            "ttft_ms": round(ttft * 1000, 1),
            "tokens_per_s": round((len(pieces) - 1) / (elapsed - ttft), 1) if len(pieces) > 1 else None,
        }

    def predict(self, images: list[str]) -> dict[str, Any]:
        import httpx

        response = httpx.post(f"{self.url}/v1/models/{MODEL}:predict", json={"image": images}, timeout=10)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


@functools.lru_cache(maxsize=4)
def _digits(count: int) -> tuple[list[str], list[int]]:
    """Return `count` of scikit-learn's 8x8 digits as base64 PNGs, and their labels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images: list[str] = []
    for pixels in data.images[-count:]:  # the tail of the set
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    return images, [int(t) for t in data.target[-count:]]


def _digit_images(count: int) -> list[str]:
    return _digits(count)[0]


def _print_summary(summary: dict[str, Any]) -> None:
    rollout = summary["rollout"]
    inference = summary["inference"]
    lines = [
        "",
        "autodl demo: summary",
        f"  model        {summary['model']}: versions {', '.join(summary['versions'])}",
        f"  rollout      {rollout['id']} {rollout['state']}" + (f" ({rollout['reason']})" if rollout["reason"] else ""),
        *[f"               {m}" for m in rollout["events"]],
        *[
            f"  device       {d['name']} {d['device_id']} {d['labels']} serves {d['serving']} at "
            f"http://127.0.0.1:{d['port']}"
            for d in summary["devices"]
        ],
        f"  inference    {inference['requests']} requests to {inference['agent']} ({inference['model_version']}): "
        f"accuracy {inference['accuracy']:.3f}, p50 {inference['p50_ms']} ms, p95 {inference['p95_ms']} ms",
        *(
            [
                f"  generation   {summary['completion']['tokens']} tokens of stdlib-code {summary['lm_version']} "
                f"streamed from {summary['completion']['agent']} (first after {summary['completion']['ttft_ms']} ms, "
                f"{summary['completion']['tokens_per_s']} tokens/s):",
                *[f"               | {line}" for line in (LM_PROMPT + summary["completion"]["text"]).splitlines()],
            ]
            if summary.get("completion")
            else []
        ),
        f"  telemetry    {summary['telemetry_points']} points received by the hub",
        f"  took         {summary['elapsed_s']} s",
        f"  API docs     {summary['docs_url']}",
        f"  dashboard    {summary['ui_url']}  (admin key {summary['admin_key']})",
        f"  data dir     {summary['data_dir']}",
    ]
    typer.echo("\n".join(lines))


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop like Ctrl-C (a KeyboardInterrupt, so every wait unwinds the same way)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def demo(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="where everything lives [default: a new temp dir]")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, max=50, help="training epochs of the candidate version")] = 4,
    requests: Annotated[int, typer.Option(min=1, max=1000, help="inference requests sent after the rollout")] = 50,
    lm_steps: Annotated[
        int, typer.Option(min=0, max=10_000, help="training steps of the text-generation model (0: leave it out)")
    ] = 60,
    keep_running: Annotated[
        bool, typer.Option("--keep-running/--exit", help="after the summary, keep serving until Ctrl-C")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="also print the summary as one JSON line")] = False,
) -> None:
    """Run the whole loop locally: hub, training, two agents, a canary rollout, inference."""
    root = data_dir or Path(tempfile.mkdtemp(prefix="autodl-demo-"))
    run = Demo(
        data_dir=root.resolve(),
        epochs=epochs,
        requests=requests,
        say=lambda m: typer.echo(f"[demo] {m}"),
        lm_steps=lm_steps,
    )
    typer.echo(f"[demo] data dir {run.data_dir} (logs: *.log there)")
    code = 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = run.run()
        _print_summary(summary)
        if as_json:
            typer.echo(json.dumps(summary))
        if keep_running:
            typer.echo("[demo] running; press Ctrl-C to stop the hub and the agents")
            while not (dead := run.children.dead()):
                time.sleep(0.5)
            typer.echo(f"[demo] {', '.join(dead)} exited; stopping", err=True)
            code = 1
    except Terminated:
        typer.echo("[demo] terminated; stopping")
    except KeyboardInterrupt:
        typer.echo("\n[demo] interrupted; stopping")
    except DemoError as exc:
        typer.echo(f"[demo] error: {exc}", err=True)
        code = 1
    finally:
        # A second Ctrl-C or SIGTERM while stopping must not leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run.children.stop_all()
        signal.signal(signal.SIGTERM, previous)
        typer.echo("[demo] stopped")
    raise typer.Exit(code)
