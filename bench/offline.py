"""Offline buffering benchmark: broker down, backlog on disk, kill -9, catch-up after reconnect.

A real mosquitto (dynamic security), a real `autodl-hub serve` on it and one real
`autodl-agent run` producing telemetry every few milliseconds. The broker is stopped, the
agent buffers at least `--points` points, is killed with SIGKILL and started again (now
producing nothing new, so the count is exact), and the broker comes back. Reported:
points buffered, how long the drain took after the agent reconnected and at what rate,
duplicates (rows in the hub minus distinct sequence numbers; redeliveries the hub's
ingest counted are reported apart as `redeliveries_ignored`: at-least-once delivery
resends a batch whose PUBACK the outage swallowed, and the hub stores it once) and
points lost (sequence numbers the agent issued that the hub lacks).

    .venv/bin/python bench/offline.py [--json] [--points 10000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fleet import Fleet  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402


def hub_counts(fleet: Fleet) -> tuple[int, int]:
    """Return (rows, distinct seqs) of the device's telemetry in the hub's database."""
    with sqlite3.connect(fleet.hub.data_dir / "hub.db", timeout=30) as db:
        row = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT seq) FROM telemetry_point WHERE device_id = ?", (fleet.device,)
        ).fetchone()
    return int(row[0]), int(row[1])


def hub_duplicates_counted(fleet: Fleet) -> int:
    """Return the duplicate points the hub's ingest saw (and ignored), from its /metrics."""
    text = httpx.get(f"{fleet.hub.url}/metrics", timeout=10).text
    match = re.search(r'autodl_hub_telemetry_points_total\{outcome="duplicate"\} ([0-9.e+]+)', text)
    return int(float(match.group(1))) if match else 0


def run(points: int, batch: int) -> dict[str, Any]:
    """Run the scenario once; return the measurements."""
    with tempfile.TemporaryDirectory(prefix="offline-bench-") as tmp:
        env = {
            "AUTODL_AGENT_TELEMETRY_INTERVAL_S": "0.005",
            "AUTODL_AGENT_OUTBOX_BATCH": str(batch),
            "AUTODL_AGENT_HEARTBEAT_S": "5",
        }
        with Fleet(Path(tmp), agents=1, agent_env=env) as fleet:
            wait_for("first points at the hub", lambda: hub_counts(fleet)[0] > 0, 60)
            fleet.broker.stop()
            start = time.monotonic()
            wait_for(f"{points} points", lambda: fleet.status()["outbox"]["telemetry_pending"] >= points, 600)
            buffer_s = time.monotonic() - start
            fleet.agent.kill9()
            fleet.agent.env["AUTODL_AGENT_TELEMETRY_INTERVAL_S"] = "3600"  # nothing new: exact counts
            fleet.agent.start()
            fleet.agent.wait_live()
            outbox = fleet.status()["outbox"]
            buffered, last = outbox["telemetry_pending"], outbox["last_telemetry_seq"]
            fleet.broker.start()
            wait_for("agent reconnected", lambda: fleet.status()["connected"], 60)
            connected = time.monotonic()
            wait_for("outbox drained", lambda: fleet.status()["outbox"]["telemetry_pending"] == 0, 600)
            acked = time.monotonic()
            wait_for("every point stored at the hub", lambda: hub_counts(fleet)[1] >= last, 120)
            stored = time.monotonic()
            rows, distinct = hub_counts(fleet)
            with sqlite3.connect(fleet.hub.data_dir / "hub.db", timeout=30) as db:
                seqs = {
                    int(r[0])
                    for r in db.execute("SELECT seq FROM telemetry_point WHERE device_id = ?", (fleet.device,))
                }
            lost = len(set(range(1, last + 1)) - seqs)
            return {
                "points_buffered": buffered,
                "last_seq": last,
                "buffer_s": round(buffer_s, 2),
                "drain_s": round(acked - connected, 3),
                "drain_points_per_s": round(buffered / max(acked - connected, 1e-9), 1),
                "stored_s": round(stored - connected, 3),
                "stored_points_per_s": round(buffered / max(stored - connected, 1e-9), 1),
                "duplicates": rows - distinct,
                "redeliveries_ignored": hub_duplicates_counted(fleet),
                "points_lost": lost,
                "dropped_by_bound": fleet.status()["outbox"]["dropped"],
                "batch": batch,
            }


def main() -> None:
    """Run the benchmark and print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--points", type=int, default=10_000, help="points to buffer while offline")
    parser.add_argument("--batch", type=int, default=1000, help="telemetry points per MQTT message")
    args = parser.parse_args()
    result = run(args.points, args.batch)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'measure':<24} {'value':>14}")
    for key, value in result.items():
        print(f"{key:<24} {value:>14}")


if __name__ == "__main__":
    main()
