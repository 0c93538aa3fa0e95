"""Run the hub: the broker (embedded or external), the MQTT session, and the HTTP API.

Order matters: the broker first (devices need it), then the hub's MQTT session (it
ingests and re-publishes retained state), then HTTP. Shutdown runs the other way.
"""

from __future__ import annotations

import logging
import signal
from contextlib import ExitStack
from multiprocessing.process import BaseProcess

import uvicorn
from sqlmodel import col, select

from hub.broker.embedded import BrokerAdmin, BrokerAdminError, EmbeddedBroker
from hub.broker.passwd import PasswordFileUsers
from hub.broker.revocation import CertificateRevocation
from hub.config import HubSettings
from hub.db import SessionFactory, create_engine_for, migrate, session_factory
from hub.limits import HeaderTimeoutH11Protocol
from hub.main import create_app
from hub.messaging.session import HubMessaging
from hub.models import Device
from hub.tls import CertificateError, ensure_certificates
from shared.private_files import make_private

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def serve(settings: HubSettings, *, mqtt: bool = True, log_level: str = "info", workers: int = 1) -> None:
    """Serve until SIGINT or SIGTERM, with `workers` embedded training worker processes."""
    make_private(settings.data_dir)
    problem = settings.transport_problem()
    if problem is not None:
        raise SystemExit(f"refusing to serve: {problem}")
    if settings.tls_enabled:
        try:
            ensure_certificates(settings)
        except CertificateError as exc:
            raise SystemExit(f"TLS: {exc}") from exc
    engine = create_engine_for(settings)
    migrate(engine)
    sessions = session_factory(engine)
    with ExitStack() as stack:
        stack.callback(engine.dispose)
        if workers > 0:
            from hub.training.worker import start_embedded_workers

            processes = start_embedded_workers(settings, workers)
            stack.callback(_stop_workers, processes)
        admin: BrokerAdmin | PasswordFileUsers | None = None
        messaging = revocation = None
        if mqtt:
            if settings.mqtt_url is None:
                broker = EmbeddedBroker.from_settings(settings)
                if broker.tls is not None and broker.tls.certificate_port is not None:
                    revocation = CertificateRevocation(settings, sessions, broker)
                    revocation.write_crl()  # the certificate listener needs it before mosquitto starts
                broker.start()
                stack.callback(broker.stop)
                url, password, ca_certs = broker.url, broker.hub_password, broker.ca_certs
                admin = broker.users  # its password file, reloaded in batches
            else:
                if settings.mqtt_password is None:
                    raise SystemExit(
                        "an external broker (--mqtt-url) needs AUTODL_HUB_MQTT_PASSWORD for the hub's user"
                    )
                url, password = settings.mqtt_url, settings.mqtt_password
                ca_certs = str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None
                admin = BrokerAdmin(url, settings.mqtt_username, password, tls_ca_certs=ca_certs)  # dynamic security
                stack.callback(admin.close)
            _reconcile(admin, sessions)
            messaging = HubMessaging(settings, sessions, url=url, password=password, tls_ca_certs=ca_certs)
            messaging.start()
            stack.callback(messaging.stop)
        app = create_app(settings, messaging, admin, engine=engine, migrate_db=False)
        app.state.certificate_revocation = revocation
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            access_log=False,
            log_config=None,
            # X-Forwarded-* only from the proxies the operator named (uvicorn trusts 127.0.0.1 by default).
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies) or None,
            # A deadline for request heads (uvicorn has none) and a bound on their size.
            http=HeaderTimeoutH11Protocol.with_timeout(settings.header_timeout_s),
            h11_max_incomplete_event_size=16 * 1024,
            ssl_certfile=str(settings.tls_cert) if settings.tls_enabled else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_enabled else None,
        )
        logger.info(
            "hub %s on %s:%s, public URL %s",
            "HTTPS" if settings.tls_enabled else "HTTP",
            settings.host,
            settings.port,
            settings.public_url,
        )
        # uvicorn re-raises the signal that stopped it once it is done; with Python's default
        # SIGTERM action that would end the process here and orphan mosquitto, so turn it
        # into SystemExit and let the stack stop the MQTT session and the broker.
        signal.signal(signal.SIGTERM, _raise_exit)
        try:
            uvicorn.Server(config).run()
        except (SystemExit, KeyboardInterrupt):
            logger.info("stopping")


def _stop_workers(processes: list[BaseProcess]) -> None:
    """Stop the embedded workers: a running job goes back to the queue for the next start."""
    for process in processes:
        process.terminate()  # SIGTERM: the worker re-queues its job and exits
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            logger.warning("training worker %s did not stop; killing it", process.name)
            process.kill()
            process.join(timeout=10)


def _raise_exit(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _reconcile(admin: BrokerAdmin | PasswordFileUsers, sessions: SessionFactory) -> None:
    """Lock out broker users of devices decommissioned while the broker could not be told."""
    try:
        with sessions() as session:
            active = session.exec(select(Device.id).where(col(Device.decommissioned).is_(False))).all()
        removed = admin.reconcile(active)
        if removed:
            logger.warning("removed %d broker users of decommissioned devices: %s", len(removed), removed)
    except BrokerAdminError as exc:
        logger.warning("could not reconcile broker users with the fleet: %s", exc)
