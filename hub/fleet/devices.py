"""The fleet: enrollment, listing and labels, decommissioning, and each device's desired state.

`update_desired` is the one writer of desired state (the API, the CLI and rollouts call
it, rollouts through `stage_desired` to commit many devices at once): it bumps the
revision, stores the shared `DesiredState` on the device row and, after the commit,
publishes it retained so the agent converges to it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Protocol

from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import ConflictError, NotFoundError, UnavailableError
from hub.models import Device, VersionStatus, utcnow
from hub.registry import desired_model, resolve_version
from hub.security import (
    DEVICE_TOKEN_PREFIX,
    MQTT_PASSWORD_PREFIX,
    claim_enrollment_token,
    hash_secret,
    new_secret,
    signing_public_key,
)
from shared.messages import DesiredModel, DesiredState, EnrollRequest, EnrollResponse

__all__ = [
    "BrokerCredentials",
    "DesiredPublisher",
    "RetainedCleaner",
    "UnknownDeviceError",
    "decommission",
    "deploy_model",
    "enroll",
    "get_device",
    "list_devices",
    "set_labels",
    "stage_desired",
    "undeploy_model",
    "update_desired",
]

logger = logging.getLogger(__name__)


class DesiredPublisher(Protocol):
    """What `update_desired` needs of `hub.messaging.session.HubMessaging`."""

    def publish_desired(self, state: DesiredState) -> object: ...

    def clear_desired(self, device_id: str) -> object: ...


class RetainedCleaner(Protocol):
    """What decommissioning needs of `hub.messaging.session.HubMessaging`."""

    def forget_device(self, device_id: str) -> object: ...


class BrokerCredentials(Protocol):
    """What enrollment and decommissioning need of `hub.broker.admin.BrokerAdmin`."""

    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...


class UnknownDeviceError(NotFoundError):
    """No device with that id."""


def get_device(session: Session, device_id: str, *, for_update: bool = False) -> Device:
    """Return a device; raise UnknownDeviceError otherwise."""
    query = select(Device).where(Device.id == device_id)
    if for_update:
        query = query.with_for_update()
    device = session.exec(query).first()
    if device is None:
        raise UnknownDeviceError(f"no device {device_id!r}")
    return device


def enroll(
    session: Session, settings: HubSettings, request: EnrollRequest, broker: BrokerCredentials | None = None
) -> EnrollResponse:
    """Trade an enrollment token and device facts for the device's own credentials."""
    token = claim_enrollment_token(session, request.token)
    device_id = f"dev-{uuid.uuid4().hex[:16]}"
    device_token, mqtt_password = new_secret(DEVICE_TOKEN_PREFIX), new_secret(MQTT_PASSWORD_PREFIX)
    # Labels from the token win: an operator chose them, the device only suggests.
    labels = {**request.labels, **token.labels}
    device = Device(
        id=device_id,
        name=request.name or device_id,
        labels=labels,
        profile=request.profile.model_dump(mode="json"),
        agent_version=request.agent_version,
        token_hash=hash_secret(device_token),
        mqtt_password_hash=hash_secret(mqtt_password),
        enrollment_token_id=token.id,
    )
    session.add(device)
    record(session, f"enrollment_token:{token.id}", "device.enroll", f"device:{device_id}", labels=labels)
    session.flush()
    if broker is not None:
        try:
            broker.add_device(device_id, mqtt_password)
        except Exception as exc:
            session.rollback()
            raise UnavailableError(f"the MQTT broker did not accept the device: {exc}") from exc
    try:
        session.commit()
    except Exception:
        session.rollback()
        if broker is not None:
            broker.remove_device(device_id)
        raise
    logger.info("enrolled device %s (%s)", device_id, device.name)
    return EnrollResponse(
        device_id=device_id,
        device_token=device_token,
        mqtt_host=settings.mqtt_public_host,
        mqtt_port=settings.agent_mqtt_port,
        mqtt_tls=settings.mqtt_tls,
        mqtt_username=device_id,
        mqtt_password=mqtt_password,
        signing_public_key=signing_public_key(settings.signing_key),
        hub_url=settings.public_url,
        labels=labels,
    )


def list_devices(
    session: Session,
    *,
    labels: Mapping[str, str] | None = None,
    online: bool | None = None,
    model: str | None = None,
    version: str | None = None,
    include_decommissioned: bool = False,
    limit: int = 1000,
    offset: int = 0,
) -> list[Device]:
    """Return devices matching every filter; `model`/`version` match what devices report running."""
    query = select(Device).order_by(col(Device.created_at), col(Device.id))
    if not include_decommissioned:
        query = query.where(col(Device.decommissioned).is_(False))
    if online is not None:
        query = query.where(col(Device.online).is_(online))
    # Label and model filters look inside JSON, which SQLite and PostgreSQL spell
    # differently; filtering here keeps one code path for both.
    matched = [d for d in session.exec(query) if _matches(d, labels or {}, model, version)]
    return matched[offset : offset + limit]


def _matches(device: Device, labels: Mapping[str, str], model: str | None, version: str | None) -> bool:
    if any(device.labels.get(k) != v for k, v in labels.items()):
        return False
    if model is None:
        return True
    status = ((device.reported or {}).get("models") or {}).get(model)
    if not isinstance(status, dict):
        return False
    return version is None or status.get("active") == version


def set_labels(session: Session, device_id: str, add: Mapping[str, str], remove: list[str], *, actor: str) -> Device:
    """Add or change some labels of a device and remove others."""
    device = get_device(session, device_id)
    labels = {k: v for k, v in device.labels.items() if k not in remove}
    labels.update(add)
    device.labels = labels
    session.add(device)
    record(session, actor, "device.label", f"device:{device_id}", set=dict(add), removed=list(remove))
    session.commit()
    return device


def decommission(
    session: Session,
    device_id: str,
    *,
    actor: str,
    broker: BrokerCredentials | None = None,
    messaging: RetainedCleaner | None = None,
) -> Device:
    """Revoke a device's credentials at once (HTTP token, MQTT login, live connection); drop its retained state."""
    device = get_device(session, device_id)
    # Repeating a decommission repeats the broker removal: it may have failed the first time.
    if not device.decommissioned:
        device.decommissioned, device.decommissioned_at = True, utcnow()
        device.token_hash, device.mqtt_password_hash, device.online = None, None, False
        session.add(device)
        record(session, actor, "device.decommission", f"device:{device_id}")
        session.commit()
    if broker is not None:
        try:
            broker.remove_device(device_id)
        except Exception as exc:
            # The HTTP token is gone already; say loudly that the broker still knows it.
            logger.error("device %s decommissioned, but the broker did not remove it: %s", device_id, exc)
            raise UnavailableError(f"device revoked in the hub, but the broker did not remove it: {exc}") from exc
    if messaging is not None:
        messaging.forget_device(device_id)
    logger.info("decommissioned device %s", device_id)
    return device


def update_desired(
    session: Session,
    device_id: str,
    changes: Mapping[str, DesiredModel | None],
    *,
    actor: str,
    messaging: DesiredPublisher | None = None,
    config: Mapping[str, object] | None = None,
) -> DesiredState:
    """Set (or, with None, remove) models in a device's desired state, bump its revision, publish it."""
    state = stage_desired(session, device_id, changes, actor=actor, config=config)
    session.commit()
    if messaging is not None:
        messaging.publish_desired(state)
    return state


def stage_desired(
    session: Session,
    device_id: str,
    changes: Mapping[str, DesiredModel | None],
    *,
    actor: str,
    config: Mapping[str, object] | None = None,
) -> DesiredState:
    """Make `update_desired`'s change in `session` without committing or publishing.

    For a caller that moves many devices: it commits them together, then publishes each
    returned state (a hub that dies in between re-publishes stored states on start).
    """
    device = get_device(session, device_id, for_update=True)
    if device.decommissioned:
        raise ConflictError(f"device {device_id} is decommissioned")
    current = (
        DesiredState.model_validate(device.desired) if device.desired else DesiredState(device_id=device_id, revision=0)
    )
    models = dict(current.models)
    for name, entry in changes.items():
        if entry is None:
            models.pop(name, None)
        else:
            models[name] = entry
    state = DesiredState(
        device_id=device_id,
        revision=current.revision + 1,
        models=models,
        config=dict(config) if config is not None else dict(current.config),
    )
    device.desired = state.model_dump(mode="json")
    session.add(device)
    record(
        session,
        actor,
        "device.desired",
        f"device:{device_id}",
        revision=state.revision,
        models={k: v.version for k, v in models.items()},
    )
    return state


def deploy_model(
    session: Session,
    settings: HubSettings,
    device_id: str,
    name: str,
    version: str,
    *,
    actor: str,
    messaging: DesiredPublisher | None = None,
) -> DesiredState:
    """Make one device run `version` (a version, ``latest`` or an alias) of model `name`."""
    get_device(session, device_id)
    model, row = resolve_version(session, name, version)
    if row.status == VersionStatus.DEPRECATED.value:
        raise ConflictError(f"{name} {row.version} is deprecated and cannot be deployed")
    return update_desired(
        session, device_id, {name: desired_model(settings, model, row)}, actor=actor, messaging=messaging
    )


def undeploy_model(
    session: Session, device_id: str, name: str, *, actor: str, messaging: DesiredPublisher | None = None
) -> DesiredState:
    """Remove model `name` from a device's desired state."""
    device = get_device(session, device_id)
    if name not in ((device.desired or {}).get("models") or {}):
        raise NotFoundError(f"device {device_id} has no desired model {name!r}")
    return update_desired(session, device_id, {name: None}, actor=actor, messaging=messaging)
