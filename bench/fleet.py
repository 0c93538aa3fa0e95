"""A simulated fleet against a real hub: enrollment, connect, rollout convergence, telemetry ingest.

Starts ``autodl-hub serve`` (SQLite, its embedded mosquitto) in a temp dir, publishes two
versions of a small model, then for each fleet size N:

- enrolls N devices over HTTP, each with one POST /enroll through the agent's own
  ``agent.enrollment.enroll`` (`--enroll-workers` requests in flight);
- connects them all from ONE process on one selector-driven loop: every device is the
  agent's real ``agent.sync.MqttSession`` (its paho client, last will, subscriptions and
  callbacks: presence on connect, desired state decoded and handed on), but instead of the
  session's two threads per device, paho's ``loop_read/loop_write/loop_misc`` are driven
  from a ``selectors`` loop (paho's ``loop_start`` stops near 1,024 file descriptors);
- the model runtime is a no-op: a device "runs" a version the moment its desired state
  names it and publishes its reported state (the agent's ``reported_state`` builder);
- starts a rollout of the new version to every device and times until every device has
  reported it (PUBACK seen) and until the hub's rollout has succeeded;
- fills each device's outbox (the agent's ``agent.store.Store``, in memory) with points and
  drains it the way the agent's sender does (oldest batch, QoS 1, acknowledged rows leave
  the outbox), timing until the hub's database holds every point.

    .venv/bin/python bench/fleet.py                        # N = 100, 1000, 5000, then 10,000 enrolled only
    .venv/bin/python bench/fleet.py --devices 1000 --enroll-only 0 --json

Then, with ``--enroll-only N`` (10,000 by default), it enrolls N more devices over HTTP
on the same hub and does nothing else with them: the enrollment figures at fleet scale,
with the time the first and the last thousand took (a cost per enrollment that grows
with the fleet would make the last thousand slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import selectors
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from agent.config import AgentSettings, Identity  # noqa: E402
from agent.daemon import reported_state  # noqa: E402
from agent.device import detect_profile  # noqa: E402
from agent.enrollment import enroll  # noqa: E402
from agent.store import ModelRecord, Slot, Store  # noqa: E402
from agent.sync import MqttSession  # noqa: E402
from hub.models import Role  # noqa: E402
from hub.security import create_api_key, create_enrollment_token  # noqa: E402
from shared.codec import encode  # noqa: E402
from shared.messages import DesiredState, TelemetryBatch, TelemetryPoint, UpdateState  # noqa: E402
from shared.topics import DeviceChannel  # noqa: E402
from tests.support.hub import HubProcess  # noqa: E402
from tests.support.models import make_release  # noqa: E402

MODEL = "clf"
BASELINE, CANDIDATE = "1.0.0", "2.0.0"
BIN = Path(sys.executable).parent


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children, mosquitto too, inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class SimDevice:
    """One device: the agent's MqttSession and Store, run by the fleet's loop instead of threads."""

    identity: Identity
    settings: AgentSettings
    fleet: Fleet
    store: Store = field(init=False)
    session: MqttSession = field(init=False)
    running: str | None = None
    revision: int = 0
    reported_version: str | None = None  # the version of the last reported state the broker acknowledged
    inflight: dict[int, tuple[str, Any]] = field(default_factory=dict)  # mid -> (what, detail)
    prepared: list[tuple[bytes, list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = Store(":memory:")
        self.session = MqttSession(
            self.identity, self.settings, on_desired=self.on_desired, on_connected=self.report, store=self.store
        )
        self.session._client.on_publish = self._on_publish
        # The device starts on the baseline, as if an earlier deployment put it there.
        self.store.save_model(ModelRecord(MODEL, UpdateState.COMMITTED, BASELINE, active=Slot(BASELINE, "cpu-fp32")))
        self.running = BASELINE

    @property
    def client(self) -> mqtt.Client:
        return self.session._client

    def connect(self) -> None:
        """Connect as MqttSession._run does (persistent session, keepalive, expiry)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self.client.connect(
            self.identity.mqtt_host,
            self.identity.mqtt_port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )

    def on_desired(self, desired: DesiredState) -> None:
        """The no-op runtime: run what the desired state names at once, then report it."""
        entry = desired.models.get(MODEL)
        if entry is None:
            return
        self.revision = desired.revision
        record = self.store.model(MODEL)
        previous = record.active
        slot = Slot(version=entry.version, target="cpu-fp32", manifest_url=str(entry.manifest_url))
        self.store.save_model(
            record.with_(active=slot, previous=previous, desired_version=entry.version, state=UpdateState.COMMITTED)
        )
        self.running = entry.version
        self.report()

    def report(self) -> None:
        state = reported_state(self.identity, self.store, self.revision, None, [])
        info = self.client.publish(self.session._topic(DeviceChannel.REPORTED), encode(state), qos=1, retain=True)
        self.inflight[info.mid] = ("reported", self.running)

    def prepare_telemetry(self, batch: int) -> None:
        """Read the whole outbox and encode it into messages as the agent's sender does, batch by batch.

        Done before the clock starts, so the ingest figure measures the hub, not this
        single simulator process (the rows leave the outbox only on PUBACK, as on a device).
        """
        rows = self.store.next_telemetry(10**9)
        self.prepared = []
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            message = TelemetryBatch(
                device_id=self.identity.device_id,
                points=[TelemetryPoint(seq=seq, **fields) for seq, fields in chunk],
            )
            self.prepared.append((encode(message), [seq for seq, _ in chunk]))

    def send_telemetry(self) -> bool:
        """Publish the next prepared batch once the last one was acknowledged; False when all are sent."""
        if any(what == "telemetry" for what, _ in self.inflight.values()):
            return True
        if not self.prepared:
            return False
        payload, seqs = self.prepared.pop(0)
        info = self.client.publish(self.session._topic(DeviceChannel.TELEMETRY), payload, qos=1)
        self.inflight[info.mid] = ("telemetry", seqs)
        return True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        what, detail = self.inflight.pop(mid, (None, None))
        if what == "reported":
            self.reported_version = detail
        elif what == "telemetry":
            self.store.ack_telemetry(detail)
            self.fleet.points_acked += len(detail)


@dataclass
class Fleet:
    """Many SimDevices on one selectors loop."""

    devices: list[SimDevice] = field(default_factory=list)
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    points_acked: int = 0
    _last_misc: float = 0.0

    def attach(self, device: SimDevice) -> None:
        client = device.client

        def register_write(c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)

        def unregister_write(c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.selector.modify(sock, selectors.EVENT_READ, device)

        device.connect()
        sock = client.socket()
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)
        client.on_socket_register_write = register_write
        client.on_socket_unregister_write = unregister_write
        self.devices.append(device)

    def step(self, timeout: float = 0.05) -> None:
        """Run one round of the loop: socket I/O, then keepalives once a second."""
        for key, events in self.selector.select(timeout):
            client = key.data.client
            if events & selectors.EVENT_READ:
                client.loop_read()
            if events & selectors.EVENT_WRITE:
                client.loop_write()
        now = time.monotonic()
        if now - self._last_misc >= 1.0:
            self._last_misc = now
            for device in self.devices:
                device.client.loop_misc()

    def run_until(self, done: Any, timeout: float, what: str) -> float:
        start = time.perf_counter()
        while not done():
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{what} not reached in {timeout}s")
            self.step()
        return time.perf_counter() - start

    def close(self) -> None:
        for device in self.devices:
            try:
                device.client.disconnect()
                device.client.loop_write()
            except (OSError, ValueError):
                pass
            device.store.close()
        self.selector.close()


class Hub(HubProcess):
    """``autodl-hub serve`` with its embedded mosquitto in a temp dir, limits raised for a fleet."""

    def __init__(self, root: Path) -> None:
        env = {
            "AUTODL_HUB_ENROLL_RATE_LIMIT": "1000000/minute",
            "AUTODL_HUB_RATE_LIMIT": "1000000/minute",
            "AUTODL_HUB_TELEMETRY_BATCH_SIZE": "5000",
            "AUTODL_HUB_HEARTBEAT_TIMEOUT_S": "3600",
        }
        super().__init__(root / "hub", env=env, log_level="warning")
        self.root = root

    def publish_versions(self) -> str:
        """Publish the baseline and the candidate; return an operator API key."""
        signer = Ed25519PrivateKey.generate()  # the hub re-signs with its own key
        for version, seed in ((BASELINE, 1), (CANDIDATE, 2)):
            self.publish(make_release(signer, MODEL, version, seed))
        with self.session() as session:
            return create_api_key(session, "bench", Role.OPERATOR, actor="bench", rate_limit="1000000/minute")[1]

    def token(self, labels: dict[str, str], max_uses: int) -> str:
        """Return an enrollment token that gives its devices `labels` (rollouts select on them)."""
        with self.session() as session:
            return create_enrollment_token(session, actor="bench", max_uses=max_uses, labels=labels)[1]

    def processes(self) -> dict[str, psutil.Process]:
        assert self.proc is not None
        hub = psutil.Process(self.proc.pid)
        found = {"hub": hub}
        for child in hub.children(recursive=True):
            if "mosquitto" in child.name():
                found["mosquitto"] = child
        return found

    def _query(self, sql: str) -> int:
        conn = sqlite3.connect(f"file:{self.root / 'hub' / 'hub.db'}?mode=ro", uri=True, timeout=30)
        try:
            return int(conn.execute(sql).fetchone()[0] or 0)
        finally:
            conn.close()

    def stored_points(self) -> int:
        """Count the stored points (the whole table: over a million rows by the last fleet size)."""
        return self._query("SELECT count(*) FROM telemetry_point")

    def last_point_id(self) -> int:
        """Return the newest point's id: cheap to poll, and new rows only ever take higher ids."""
        return self._query("SELECT max(id) FROM telemetry_point")


@dataclass
class Enrollment:
    """N devices enrolled over HTTP: their identities, and the clock and the hub's CPU every 1,000."""

    identities: list[Identity]
    seconds: float
    # After every 1,000 answers (and the last): (answers, seconds, hub CPU s, mosquitto CPU s).
    marks: list[tuple[int, float, float, float]]

    def window(self, first: bool) -> dict[str, float]:
        """Return the first or the last thousand: seconds, and hub and mosquitto CPU ms per enrollment."""
        marks = [(0, 0.0, 0.0, 0.0), *self.marks]
        (n0, t0, h0, m0), (n1, t1, h1, m1) = (marks[0], marks[1]) if first else (marks[-2], marks[-1])
        count = max(1, n1 - n0)
        return {
            "s": round(t1 - t0, 2),
            "hub_cpu_ms_each": round(1000 * (h1 - h0) / count, 2),
            "mosquitto_cpu_ms_each": round(1000 * (m1 - m0) / count, 2),
        }


def enroll_fleet(hub: Hub, token: str, settings: list[AgentSettings], workers: int) -> Enrollment:
    """Enroll every device with the agent's own ``agent.enrollment.enroll``, `workers` at a time.

    One POST /enroll per device, each answer saved to the device's state dir; the HTTP
    connections are shared and the device profile is detected once (the same machine).
    """
    profile = detect_profile()
    procs = hub.processes()

    def cpu(name: str) -> float:
        proc = procs.get(name)
        return sum(proc.cpu_times()[:2]) if proc is not None else 0.0

    cpu0 = {name: cpu(name) for name in ("hub", "mosquitto")}
    marks: list[tuple[int, float, float, float]] = []
    answers = 0
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()

        def one(i: int) -> Identity:
            nonlocal answers
            s = settings[i]
            identity = enroll(s, hub.url, token, s.state_dir.name, client=client, profile=profile)
            with lock:
                answers += 1
                if answers % 1000 == 0 or answers == len(settings):
                    hub_s, mosquitto_s = (cpu(name) - cpu0[name] for name in ("hub", "mosquitto"))
                    marks.append((answers, time.perf_counter() - t0, hub_s, mosquitto_s))
            return identity

        with ThreadPoolExecutor(workers) as pool:
            identities = list(pool.map(one, range(len(settings))))
        seconds = time.perf_counter() - t0
    return Enrollment(identities, seconds, marks)


class Usage:
    """CPU seconds and peak RSS of the hub and its mosquitto (and this simulator's CPU) over one phase."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.cpu0 = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
        self.me = psutil.Process()  # the simulator, on the same two cores
        self.me_cpu0 = sum(self.me.cpu_times()[:2])
        self.t0 = time.perf_counter()

    def result(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            used = sum(proc.cpu_times()[:2]) - self.cpu0[name]
            out[f"{name}_cpu_pct"] = round(100 * used / max(wall, 1e-9), 1)
            out[f"{name}_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
        out["bench_cpu_pct"] = round(100 * (sum(self.me.cpu_times()[:2]) - self.me_cpu0) / max(wall, 1e-9), 1)
        return out


def enroll_row(
    hub: Hub, n: int, args: argparse.Namespace, kind: str
) -> tuple[Enrollment, list[AgentSettings], dict[str, Any]]:
    """Enroll `n` devices (labelled ``fleet=<kind><n>`` by their token); return them and the figures."""
    token = hub.token({"fleet": f"{kind}{n}"}, n)
    root = hub.root / f"{kind}-{n}"
    settings = [AgentSettings(state_dir=root / f"d{i:05d}", keepalive_s=60, outbox_batch=args.batch) for i in range(n)]
    logging.getLogger("agent").setLevel(logging.ERROR)
    usage = Usage(hub.processes())
    load = os.getloadavg()[0]
    done = enroll_fleet(hub, token, settings, args.enroll_workers)
    figures = {
        "enroll_s": round(done.seconds, 2),
        "enroll_per_s": round(n / done.seconds, 1),
        "enroll_first_1000": done.window(first=True),
        "enroll_last_1000": done.window(first=False),
        "enroll_load_avg_1m": round(load, 2),
        "enroll": usage.result(),
    }
    return done, settings, figures


def run_size(hub: Hub, api_key: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one fleet size; return its row."""
    enrolled, settings, enroll_figures = enroll_row(hub, n, args, "")
    identities = enrolled.identities

    fleet = Fleet()
    procs = hub.processes()
    try:
        usage = Usage(procs)
        t0 = time.perf_counter()
        for identity, s in zip(identities, settings, strict=True):
            fleet.attach(SimDevice(identity, s, fleet))
            fleet.step(0)
        fleet.run_until(
            lambda: all(d.reported_version == BASELINE for d in fleet.devices), args.timeout, "every device connected"
        )
        connect_s = time.perf_counter() - t0
        connect_usage = usage.result()

        usage = Usage(procs)
        body = {
            "model": MODEL,
            "version": CANDIDATE,
            "selector": {"labels": {"fleet": str(n)}},
            "steps": [100],
            "analysis": {
                "min_observation_s": 0,
                "min_devices_reporting": 1,
                "max_error_rate_increase": None,
                "max_latency_increase": None,
                "update_timeout_s": 600,
            },
        }
        t0 = time.perf_counter()
        rollout_id = hub.call("POST", "/rollouts", key=api_key, json=body)["id"]
        fleet.run_until(
            lambda: all(d.reported_version == CANDIDATE for d in fleet.devices), args.timeout, "every device on it"
        )
        converge_s = time.perf_counter() - t0
        state = "running"
        while state == "running" and time.perf_counter() - t0 < args.timeout:
            for _ in range(20):
                fleet.step(0.01)
            # The list form: the detail lists every device, which costs the hub more than the rollout.
            newest = hub.call("GET", "/rollouts", key=api_key, params={"model": MODEL, "limit": 1})
            state = next((r["state"] for r in newest if r["id"] == rollout_id), "gone")
        rollout_s = time.perf_counter() - t0
        rollout_usage = usage.result()

        # Telemetry: fill every outbox, then drain it as the agent's sender does.
        before = hub.stored_points()
        stamp = datetime.now(UTC).isoformat()
        per_device = max(1, args.total_points // n)
        for device in fleet.devices:
            device.store.enqueue_telemetry([(stamp, "requests", float(i), {"model": MODEL}) for i in range(per_device)])
        expected = per_device * n
        for device in fleet.devices:
            device.prepare_telemetry(args.batch)
        fleet.points_acked = 0
        # Polled by id, not count(*): counting a table of a million rows four times a second
        # took CPU from the hub on this two-core machine. The exact count follows the clock.
        first_id = hub.last_point_id()
        usage = Usage(procs)
        t0 = time.perf_counter()
        pending = list(fleet.devices)
        last_check = 0.0
        while time.perf_counter() - t0 < args.timeout:
            pending = [d for d in pending if d.send_telemetry()]
            fleet.step(0.01)
            if time.perf_counter() - last_check > 0.25:
                last_check = time.perf_counter()
                if hub.last_point_id() - first_id >= expected:
                    break
        ingest_s = time.perf_counter() - t0
        ingest_usage = usage.result()
        stored = hub.stored_points() - before
    finally:
        fleet.close()
    return {
        "devices": n,
        **enroll_figures,
        "connect_s": round(connect_s, 2),
        "converge_s": round(converge_s, 2),
        "rollout_state": state,
        "rollout_s": round(rollout_s, 2),
        "points": expected,
        "points_stored": stored,
        "points_lost": expected - stored,
        "ingest_s": round(ingest_s, 2),
        "ingest_points_per_s": round(stored / ingest_s, 1),
        "connect": connect_usage,
        "rollout": rollout_usage,
        "ingest": ingest_usage,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("devices", "devices", "{}"),
        ("connect_s", "connect s", "{:.2f}"),
        ("converge_s", "converge s", "{:.2f}"),
        ("rollout_s", "rollout done s", "{:.2f}"),
        ("points", "points", "{}"),
        ("points_lost", "lost", "{}"),
        ("ingest_points_per_s", "points/s", "{:.0f}"),
    ]
    phases = [("connect", "connect"), ("rollout", "rollout"), ("ingest", "ingest")]
    header = (
        [title for _, title, _ in columns] + [f"hub CPU % {t}" for _, t in phases] + ["hub RSS MB", "mosquitto RSS MB"]
    )
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        if "connect_s" not in row:
            continue
        cells = [fmt.format(row[key]) for key, _, fmt in columns]
        cells += [f"{row[p].get('hub_cpu_pct', 0):.0f}" for p, _ in phases]
        cells += [f"{row['ingest'].get('hub_rss_mb', 0):.0f}", f"{row['ingest'].get('mosquitto_rss_mb', 0):.0f}"]
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def _enroll_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "devices enrolled",
        "already enrolled",
        "enroll s",
        "enrollments/s",
        "first 1,000: s",
        "hub CPU ms each",
        "mosquitto CPU ms each",
        "last 1,000: s",
        "hub CPU ms each",
        "mosquitto CPU ms each",
        "hub CPU %",
        "load avg",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        usage = row["enroll"]
        cells = [
            str(row["devices"]),
            str(row["already_enrolled"]),
            f"{row['enroll_s']:.1f}",
            f"{row['enroll_per_s']:.0f}",
            *(
                f"{row[f'enroll_{which}_1000'][key]:.2f}"
                for which in ("first", "last")
                for key in ("s", "hub_cpu_ms_each", "mosquitto_cpu_ms_each")
            ),
            f"{usage.get('hub_cpu_pct', 0):.0f}",
            f"{row['enroll_load_avg_1m']:.1f}",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def main() -> None:
    """Parse arguments, run every size against one hub, print the tables (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, action="append", help="fleet size (repeatable; default 100, 1000, 5000)")
    parser.add_argument(
        "--enroll-only", type=int, default=10_000, help="then enroll this many more devices and only that (0: none)"
    )
    parser.add_argument("--enroll-workers", type=int, default=64, help="enrollment requests in flight")
    parser.add_argument("--total-points", type=int, default=500_000, help="telemetry points queued over the fleet")
    parser.add_argument(
        "--batch", type=int, default=1000, help="points per telemetry message (the agent's outbox_batch)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each phase")
    parser.add_argument("--json", action="store_true", help="print JSON: the largest size's figures, and every row")
    args = parser.parse_args()
    sizes = sorted(args.devices or [100, 1000, 5000])
    limit = raise_nofile()
    if limit < 2 * max(sizes) + 200:
        parser.error(f"the open-file hard limit {limit} is too low for {max(sizes)} devices")
    rows = []
    with tempfile.TemporaryDirectory(prefix="autodl-fleet-") as tmp:
        hub = Hub(Path(tmp))
        api_key = hub.publish_versions()
        hub.start()
        enrolled = 0
        try:
            for n in sizes:
                rows.append({**run_size(hub, api_key, n, args), "already_enrolled": enrolled})
                enrolled += n
                print(f"N={n}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
            if args.enroll_only:
                _, _, figures = enroll_row(hub, args.enroll_only, args, "enroll-only-")
                rows.append({"devices": args.enroll_only, "already_enrolled": enrolled, **figures})
                print(f"enroll only N={args.enroll_only}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        finally:
            hub.stop()
    if args.json:
        print(json.dumps({**rows[-1], "runs": rows}))
    else:
        print(_table(rows))
        print()
        print(_enroll_table(rows))


if __name__ == "__main__":
    main()
