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

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError, UnavailableError
from hub.models import (
    Artifact,
    AuditEvent,
    Command,
    Device,
    EnrollmentToken,
    Model,
    ModelVersion,
    Rollout,
    VersionStatus,
    utcnow,
)
from hub.registry import desired_model, resolve_version
from hub.security import (
    DEVICE_TOKEN_PREFIX,
    MQTT_PASSWORD_PREFIX,
    claim_enrollment_token,
    hash_secret,
    new_secret,
    signing_public_key,
)
from hub.tls import CertificateError, issue_device_certificate
from shared.messages import DesiredModel, DesiredState, EnrollRequest, EnrollResponse

__all__ = [
    "BrokerCredentials",
    "CertificateRevoker",
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


class CertificateRevoker(Protocol):
    """What decommissioning needs of `hub.broker.revocation.CertificateRevocation`."""

    def revoke(self, device_id: str) -> None: ...


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


def desired_versions(session: Session, device_id: str) -> set[tuple[str, str]]:
    """Return the (model, version) pairs a device token may read.

    Those of its desired state, and those an operator sent it with a ``deploy`` command
    (which bypasses the desired state) that has not expired.
    """
    desired = session.exec(select(Device.desired).where(Device.id == device_id)).first() or {}
    models = desired.get("models") if isinstance(desired, dict) else None
    pairs: set[tuple[str, str]] = set()
    if isinstance(models, dict):
        pairs = {(str(name), str(entry.get("version"))) for name, entry in models.items() if isinstance(entry, dict)}
    now = utcnow()
    deploys = session.exec(
        select(Command.args).where(
            Command.device_id == device_id,
            Command.name == "deploy",
            col(Command.expires_at).is_(None) | (col(Command.expires_at) > now),
        )
    ).all()
    for args in deploys:
        if isinstance(args, dict) and "model" in args and "version" in args:
            pairs.add((str(args["model"]), str(args["version"])))
    return pairs


def device_may_read_version(session: Session, device_id: str, model: str, version: str) -> bool:
    """Return True when `model` `version` is in the device's desired state."""
    return (model, version) in desired_versions(session, device_id)


def device_may_read_artifact(session: Session, device_id: str, sha256: str) -> bool:
    """Return True when a file with `sha256` belongs to a version in the device's desired state."""
    allowed = desired_versions(session, device_id)
    if not allowed:
        return False
    owners = session.exec(
        select(Model.name, ModelVersion.version)
        .join(ModelVersion, col(ModelVersion.model_id) == col(Model.id))
        .join(Artifact, col(Artifact.version_id) == col(ModelVersion.id))
        .where(Artifact.sha256 == sha256)
    ).all()
    return any((name, version) in allowed for name, version in owners)


def refused_label_keys(
    session: Session,
    settings: HubSettings,
    allowed: list[str] | None,
    wanted: Mapping[str, str],
    fixed: Mapping[str, str],
) -> list[str]:
    """Return the label keys a device asked for but may not set itself, sorted.

    Keys the token fixes are not the device's to set (the token's value wins anyway).
    A token with `allowed` keys lets the device set those only; without, any key but the
    protected ones (`protected_label_keys`) and those a rollout selector has used, since
    rollouts pick devices by them.
    """
    own = [key for key in wanted if key not in fixed]
    if not own:
        return []
    if allowed is not None:
        return sorted(key for key in own if key not in set(allowed))
    protected = set(settings.protected_label_keys)
    for spec in session.exec(select(Rollout.spec)).all():
        selector = spec.get("selector") if isinstance(spec, dict) else None
        if isinstance(selector, dict) and isinstance(selector.get("labels"), dict):
            protected.update(selector["labels"])
    return sorted(key for key in own if key in protected)


def enroll(
    session: Session, settings: HubSettings, request: EnrollRequest, broker: BrokerCredentials | None = None
) -> EnrollResponse:
    """Trade an enrollment token and device facts for the device's own credentials."""
    token = claim_enrollment_token(session, request.token)
    refused = refused_label_keys(session, settings, token.device_label_keys, request.labels, token.labels)
    if refused:
        session.rollback()  # the token's use is not spent on a refused enrollment
        raise PermissionDeniedError(
            f"this enrollment token does not let a device set label(s) {', '.join(refused)}: "
            "put them on the token, or let the token allow them (device_label_keys)"
        )
    device_id = f"dev-{uuid.uuid4().hex[:16]}"
    certificate, serial = _device_certificate(session, settings, request, device_id)
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
        certificate_serial=serial,
    )
    session.add(device)
    event = record(session, f"enrollment_token:{token.id}", "device.enroll", f"device:{device_id}", labels=labels)
    session.flush()
    token_id, event_id, name = token.id, event.id, device.name
    # Committed before the broker is told, so no enrollment holds the database's write lock
    # while it waits for the broker (which takes the enrollments that arrive together at once).
    session.commit()
    if broker is not None:
        try:
            broker.add_device(device_id, mqtt_password)
        except Exception as exc:
            _undo_enrollment(session, device_id, token_id, event_id, broker)
            raise UnavailableError(f"the MQTT broker did not accept the device: {exc}") from exc
    logger.info("enrolled device %s (%s)", device_id, name)
    return EnrollResponse(
        device_id=device_id,
        device_token=device_token,
        mqtt_host=settings.mqtt_public_host,
        mqtt_port=settings.mtls_port if certificate is not None and settings.mtls_port else settings.agent_mqtt_port,
        mqtt_tls=settings.mqtt_tls,
        mqtt_username=device_id,
        mqtt_password=mqtt_password,
        signing_public_key=signing_public_key(settings.signing_key),
        hub_url=settings.public_url,
        labels=labels,
        device_certificate=certificate,
    )


def _device_certificate(
    session: Session, settings: HubSettings, request: EnrollRequest, device_id: str
) -> tuple[str | None, str | None]:
    """Return (certificate PEM, hex serial) for the request's CSR, (None, None) without one."""
    if request.csr is None:
        return None, None
    if settings.mtls_port is None:
        session.rollback()  # the token's use is not spent on a refused enrollment
        raise ConflictError(
            "this hub issues no device certificates: its broker has no certificate listener "
            "(TLS is off, or AUTODL_HUB_MQTT_MTLS_PORT is not set for the external broker)"
        )
    try:
        return issue_device_certificate(settings, request.csr, device_id)
    except CertificateError as exc:
        session.rollback()
        raise InvalidInputError(f"device certificate: {exc}") from exc


def _undo_enrollment(
    session: Session, device_id: str, token_id: int | None, event_id: int | None, broker: BrokerCredentials
) -> None:
    """Take back an enrollment the broker refused: the device, its audit event and the token's use."""
    session.rollback()
    session.execute(delete(Device).where(col(Device.id) == device_id))
    if event_id is not None:
        session.execute(delete(AuditEvent).where(col(AuditEvent.id) == event_id))
    session.execute(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.id) == token_id, col(EnrollmentToken.uses) > 0)
        .values(uses=col(EnrollmentToken.uses) - 1)
    )
    session.commit()
    try:
        broker.remove_device(device_id)  # it may still take the login later; nobody knows its password
    except Exception as exc:
        logger.warning("could not remove the refused device %s from the broker: %s", device_id, exc)


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
    revoker: CertificateRevoker | None = None,
) -> Device:
    """Revoke a device's credentials at once (HTTP token, MQTT login or certificate, live connection);
    drop its retained state."""
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
    if revoker is not None and device.certificate_serial is not None:
        try:
            revoker.revoke(device_id)
        except Exception as exc:
            logger.error("device %s decommissioned, but its certificate is not refused yet: %s", device_id, exc)
            raise UnavailableError(f"device revoked in the hub, but the broker may still accept it: {exc}") from exc
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
