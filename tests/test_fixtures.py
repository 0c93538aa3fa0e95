"""The shared fixtures work: the broker persists retained messages, PostgreSQL answers."""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.processes import Broker


def _client(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def test_retained_qos1_message_survives_a_broker_restart(mqtt_broker: Broker) -> None:
    pub = _client(mqtt_broker)
    pub.publish("autodl/v1/test/retained", b"hello", qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()

    mqtt_broker.restart()

    got = threading.Event()
    received: list[bytes] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.payload)
        got.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t-sub")
    sub.on_message = on_message
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.subscribe("autodl/v1/test/retained", qos=1)
    sub.loop_start()
    try:
        assert got.wait(5), "the retained message did not survive the restart"
        assert received == [b"hello"]
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_postgres_fixture_gives_a_private_schema(postgres_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE probe (id int)"))
        schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
    assert schema.startswith("autodl_test_")
    engine.dispose()
