"""The cost of tracing on the agent's serving path: request latency and throughput, traces off and on.

For each mode a fresh mosquitto, `autodl-hub serve` and `autodl-agent run` (real processes,
as tests/e2e starts them) serve one small linear model; then, over keep-alive HTTP to the
agent's OIP v2 endpoint, one client sends `--requests` sequential requests (latency
percentiles), and `--clients` clients send requests for `--seconds` (throughput). Modes:

- off: no OTEL_* variable (tracing not configured: nothing of opentelemetry is imported);
- on: OTLP/HTTP to a live receiver (tests.support.otlp) that decodes every span;
- collector down: OTLP/HTTP to a port where nothing listens (spans are dropped and counted).

Modes run interleaved `--rounds` times and the table gives the median of the rounds, so the
machine's noise hits every mode alike. On a busy machine end-to-end latency is mostly
scheduling, so a second table isolates the CPU time the serving thread spends on the spans
of one request (the five spans of an OIP v2 request: request, pre-processing, session run,
post-processing, nothing else inside), measured with `time.thread_time` in a subprocess per
mode; export runs on the SDK's own thread and is not in that figure. Prints the CPU flags.

    .venv/bin/python bench/tracing.py [--json] [--requests 2000] [--clients 4] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from agent.device import cpu_flags  # noqa: E402
from tests.support.agent import AgentProcess  # noqa: E402
from tests.support.broker import secured_broker  # noqa: E402
from tests.support.hub import HubProcess  # noqa: E402
from tests.support.otlp import OtlpReceiver  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

MODEL = "clf"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}
MODES = ("off", "on", "collector down")


@contextmanager
def agent_serving(mode: str, receiver: OtlpReceiver) -> Iterator[AgentProcess]:
    """Start broker, hub and agent with tracing set up for `mode`; yield the serving agent."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    for key in saved:
        del os.environ[key]
    if mode == "on":
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    elif mode == "collector down":
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        broker = secured_broker(root / "mosquitto")
        stack.callback(broker.stop)
        hub = HubProcess(root / "hub", broker)
        key, token = hub.prepare(MODEL, {"1.0.0": {"seed": 1}})
        hub.start()
        stack.callback(hub.stop)
        agent = AgentProcess(root / "agent")
        agent.enroll(hub.url, token)
        agent.start().wait_live()
        stack.callback(agent.stop)
        hub.call("PUT", key=key, path=f"/devices/{agent.device_id}/models/{MODEL}", json={"version": "1.0.0"})
        wait_for("the agent to serve the model", lambda: agent.serving(MODEL) == "1.0.0")
        for key_ in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[key_]
        os.environ.update(saved)
        yield agent


def latency(url: str, requests: int) -> dict[str, float]:
    """Return p50/p95/p99/mean milliseconds of `requests` sequential requests."""
    times: list[float] = []
    with httpx.Client(timeout=30) as client:
        for _ in range(50):  # warm-up: connection, first runs
            client.post(url, json=BODY).raise_for_status()
        for _ in range(requests):
            started = time.perf_counter()
            client.post(url, json=BODY).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": times[len(times) // 2],
        "p95_ms": times[int(len(times) * 0.95)],
        "p99_ms": times[int(len(times) * 0.99)],
        "mean_ms": statistics.fmean(times),
    }


def throughput(url: str, clients: int, seconds: float) -> float:
    """Return requests per second that `clients` keep-alive clients complete in `seconds`."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop:
                client.post(url, json=BODY).raise_for_status()
                done[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


SPAN_COST = """
import json, sys, time
from shared import tracing
from shared.tracecontext import parse
tracing.configure("bench")
parent = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
attributes = {"model": "clf", "version": "1.0.0"}
def request():
    with tracing.span("agent.infer", attributes, parent=parent):
        with tracing.span("agent.infer.preprocess"):
            pass
        with tracing.span("agent.infer.run"):
            pass
        with tracing.span("agent.infer.postprocess"):
            pass
for _ in range(500):
    request()
n = int(sys.argv[1])
started = time.thread_time()
for _ in range(n):
    request()
cost = (time.thread_time() - started) / n
tracing.shutdown()
print(json.dumps({"us_per_request": cost * 1e6, "spans": tracing.stats()}))
"""


def span_cost(mode: str, endpoint: str, requests: int) -> dict[str, Any]:
    """Return the serving thread's CPU microseconds per request spent on its spans, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if mode != "off":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    out = subprocess.run(
        [sys.executable, "-c", SPAN_COST, str(requests)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def spans_metric(agent: AgentProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{agent.port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("autodl_agent_tracing_spans_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.split()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per mode and round")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode")
    parser.add_argument("--span-requests", type=int, default=20000, help="requests timed for the span CPU cost")
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with OtlpReceiver() as receiver:
        for _ in range(args.rounds):
            for mode in MODES:
                with agent_serving(mode, receiver) as agent:
                    url = f"http://127.0.0.1:{agent.port}/v2/models/{MODEL}/infer"
                    row: dict[str, Any] = latency(url, args.requests)
                    row["rps"] = throughput(url, args.clients, args.seconds)
                    time.sleep(0.5)  # let the batch processor export the last spans
                    row["spans"] = spans_metric(agent)
                    results[mode].append(row)
        costs = {
            "off": span_cost("off", "", args.span_requests),
            "on": span_cost("on", receiver.endpoint, args.span_requests),
            "collector down": span_cost("on", f"http://127.0.0.1:{free_port()}", args.span_requests),
        }
    summary = {
        mode: {key: statistics.median(r[key] for r in rows) for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "rps")}
        for mode, rows in results.items()
    }
    for mode in MODES:
        summary[mode]["spans"] = results[mode][-1]["spans"]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": cpu_flags()}
    if args.json:
        document = {"machine": machine, "args": vars(args), "modes": summary, "rounds": results, "span_cost": costs}
        print(json.dumps(document))  # noqa: T201
        return
    print(f"CPU: {machine['cpu']}, {machine['cores']} cores, flags: {' '.join(machine['flags'])}")  # noqa: T201
    print(  # noqa: T201
        f"{args.requests} sequential requests, then {args.clients} clients for {args.seconds:.0f}s;"
        f" median of {args.rounds} interleaved rounds"
    )
    header = f"{'tracing':<16}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>9}  spans (last round)"
    print(header)  # noqa: T201
    print("-" * len(header))  # noqa: T201
    for mode, row in summary.items():
        spans = ", ".join(f"{k} {int(v)}" for k, v in sorted(row["spans"].items())) or "-"
        print(  # noqa: T201
            f"{mode:<16}{row['p50_ms']:>9.2f}{row['p95_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['mean_ms']:>9.2f}"
            f"{row['rps']:>9.0f}  {spans}"
        )
    print()  # noqa: T201
    print(f"CPU time of the serving thread on the spans of one request ({args.span_requests} requests)")  # noqa: T201
    for mode, cost in costs.items():
        spans = ", ".join(f"{k} {v}" for k, v in sorted(cost["spans"].items())) or "-"
        print(f"{mode:<16}{cost['us_per_request']:>9.1f} us  spans: {spans}")  # noqa: T201


if __name__ == "__main__":
    main()
