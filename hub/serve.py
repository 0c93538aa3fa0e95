"""Run the hub: the broker (embedded or external), the MQTT session, and the HTTP API.

Order matters: the broker first (devices need it), then the hub's MQTT session (it
ingests and re-publishes retained state), then HTTP. Shutdown runs the other way.
"""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack

import uvicorn
from sqlmodel import col, select

from hub.broker.embedded import BrokerAdmin, BrokerAdminError, EmbeddedBroker
from hub.config import HubSettings
from hub.db import SessionFactory, create_engine_for, migrate, session_factory
from hub.main import create_app
from hub.messaging.session import HubMessaging
from hub.models import Device

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def serve(settings: HubSettings, *, mqtt: bool = True, log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM."""
    engine = create_engine_for(settings)
    migrate(engine)
    sessions = session_factory(engine)
    with ExitStack() as stack:
        stack.callback(engine.dispose)
        admin = messaging = None
        if mqtt:
            if settings.mqtt_url is None:
                broker = EmbeddedBroker.from_settings(settings)
                broker.start()
                stack.callback(broker.stop)
                url, password = broker.url, broker.hub_password
            else:
                if settings.mqtt_password is None:
                    raise SystemExit(
                        "an external broker (--mqtt-url) needs AUTODL_HUB_MQTT_PASSWORD for the hub's user"
                    )
                url, password = settings.mqtt_url, settings.mqtt_password
            admin = BrokerAdmin(url, settings.mqtt_username, password)
            stack.callback(admin.close)
            _reconcile(admin, sessions)
            messaging = HubMessaging(settings, sessions, url=url, password=password)
            messaging.start()
            stack.callback(messaging.stop)
        app = create_app(settings, messaging, admin, engine=engine, migrate_db=False)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=log_level, access_log=False, log_config=None
        )
        logger.info("hub HTTP on %s:%s, public URL %s", settings.host, settings.port, settings.public_url)
        # uvicorn re-raises the signal that stopped it once it is done; with Python's default
        # SIGTERM action that would end the process here and orphan mosquitto, so turn it
        # into SystemExit and let the stack stop the MQTT session and the broker.
        signal.signal(signal.SIGTERM, _raise_exit)
        try:
            uvicorn.Server(config).run()
        except (SystemExit, KeyboardInterrupt):
            logger.info("stopping")


def _raise_exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _reconcile(admin: BrokerAdmin, sessions: SessionFactory) -> None:
    """Lock out broker users of devices decommissioned while the broker could not be told."""
    try:
        with sessions() as session:
            active = session.exec(select(Device.id).where(col(Device.decommissioned).is_(False))).all()
        removed = admin.reconcile(active)
        if removed:
            logger.warning("removed %d broker users of decommissioned devices: %s", len(removed), removed)
    except BrokerAdminError as exc:
        logger.warning("could not reconcile broker users with the fleet: %s", exc)
