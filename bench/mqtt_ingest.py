"""Telemetry ingest throughput: devices -> embedded mosquitto -> HubMessaging -> database.

Starts an embedded broker and the hub's MQTT session on a fresh database, connects
``--devices`` simulated devices (real MQTT clients with their own broker users), has each
publish ``--batches`` telemetry batches of ``--points`` points (and, with ``--resend``,
every batch a second time, as an agent does after a lost PUBACK), and times until every
point is in the database. Prints a table, or JSON with ``--json``.

    .venv/bin/python bench/mqtt_ingest.py --devices 20 --batches 50 --points 20
    .venv/bin/python bench/mqtt_ingest.py --database-url postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402
from sqlmodel import Session, col, func, select  # noqa: E402

from hub.broker.embedded import EmbeddedBroker  # noqa: E402
from hub.config import HubSettings  # noqa: E402
from hub.db import create_engine_for, migrate, session_factory  # noqa: E402
from hub.messaging.session import HubMessaging  # noqa: E402
from hub.models import Device, TelemetryPoint  # noqa: E402
from shared import codec, topics  # noqa: E402
from shared.messages import TelemetryBatch  # noqa: E402
from shared.messages import TelemetryPoint as WirePoint  # noqa: E402
from shared.topics import DeviceChannel  # noqa: E402
from tests.support.processes import free_port  # noqa: E402


def _publish_all(port: int, device_id: str, batches: int, points: int, resend: bool) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{device_id}", protocol=mqtt.MQTTv5)
    client.username_pw_set(device_id, f"pw-{device_id}")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topic = topics.device_topic(device_id, DeviceChannel.TELEMETRY)
    now = datetime.now(UTC)
    infos = []
    for b in range(batches):
        batch = TelemetryBatch(
            device_id=device_id,
            points=[WirePoint(seq=b * points + i, ts=now, name="latency_ms", value=float(i)) for i in range(points)],
        )
        payload = codec.encode(batch)
        for _ in range(2 if resend else 1):
            infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


@contextmanager
def _database(url: str | None, root: Path) -> Iterator[str]:
    """Yield the URL to measure on: a SQLite file, or a throwaway schema of the PostgreSQL database."""
    if url is None or not url.startswith("postgresql"):
        yield url or f"sqlite:///{root / 'hub.db'}"
        return
    schema = f"autodl_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield (
            make_url(url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement and return its figures."""
    with tempfile.TemporaryDirectory() as tmp, _database(args.database_url, Path(tmp)) as database_url:
        root = Path(tmp)
        settings = HubSettings(
            data_dir=root,
            database_url=database_url,
            mqtt_password="bench-hub-password",
            telemetry_batch_size=args.batch_size,
            telemetry_flush_s=args.flush_s,
        )
        engine = create_engine_for(settings)
        migrate(engine)
        ids = [f"bench-{i:04d}" for i in range(args.devices)]
        with Session(engine) as session:
            for device_id in ids:
                session.add(Device(id=device_id))
            session.commit()
        broker = EmbeddedBroker(
            root / "mosquitto",
            port=free_port(),
            hub_username=settings.mqtt_username,
            hub_password="bench-hub-password",
            bind_host="127.0.0.1",
        )
        with broker, broker.admin() as admin:
            for device_id in ids:
                admin.add_device(device_id, f"pw-{device_id}")
            messaging = HubMessaging(settings, session_factory(engine), url=broker.url, client_id="bench-hub")
            with messaging:
                messaging.wait_connected()
                expected = args.devices * args.batches * args.points
                start = time.perf_counter()
                threads = [
                    threading.Thread(target=_publish_all, args=(broker.port, d, args.batches, args.points, args.resend))
                    for d in ids
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                published = time.perf_counter() - start
                stored = 0
                while time.perf_counter() - start < args.timeout:
                    with Session(engine) as session:
                        query = select(func.count()).select_from(TelemetryPoint)
                        stored = int(session.exec(query.where(col(TelemetryPoint.device_id).in_(ids))).one())
                    if stored >= expected and messaging.queue_depth == 0:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - start
                snap = messaging.snapshot()
        engine.dispose()
    messages = args.devices * args.batches * (2 if args.resend else 1)
    return {
        "database": "postgresql" if args.database_url and "postgresql" in args.database_url else "sqlite",
        "devices": args.devices,
        "messages": messages,
        "points_expected": expected,
        "points_stored": stored,
        "points_duplicate": snap.points_duplicate,
        "rejected": snap.total_rejected,
        "publish_s": round(published, 3),
        "stored_s": round(elapsed, 3),
        "messages_per_s": round(messages / elapsed, 1),
        "points_per_s": round(expected / elapsed, 1),
    }


def main() -> None:
    """Parse arguments, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--batches", type=int, default=50, help="batches per device")
    parser.add_argument("--points", type=int, default=20, help="points per batch")
    parser.add_argument("--resend", action="store_true", help="publish every batch twice")
    parser.add_argument("--batch-size", type=int, default=500, help="telemetry_batch_size (points per DB write)")
    parser.add_argument("--flush-s", type=float, default=0.5, help="telemetry_flush_s")
    parser.add_argument(
        "--database-url", default=None, help="default: a SQLite file in a temp dir; PostgreSQL: a throwaway schema"
    )
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
