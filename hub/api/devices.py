"""Devices: list and filter, get (desired next to reported), label, decommission, deploy a model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from hub.api.deps import BrokerDep, Caller, DeviceIdPath, MessagingDep, ModelNamePath, Operator, SettingsDep, Viewer
from hub.api.schemas import ConfigUpdate, DeployRequest, DevicePublic, LabelsUpdate
from hub.db import SessionDep
from hub.errors import InvalidInputError, PermissionDeniedError
from hub.fleet import devices
from hub.models import Device, Role
from shared.messages import DesiredState

router = APIRouter(tags=["devices"])


def device_public(device: Device) -> DevicePublic:
    """Return the API form of a device."""
    return DevicePublic.model_validate(device, from_attributes=True)


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"label filter {item!r}: use key=value")
        labels[key] = value
    return labels


@router.get("/devices")
def list_devices(
    session: SessionDep,
    _caller: Viewer,
    label: Annotated[list[str], Query(max_length=32, description="key=value; every one must match")] = [],  # noqa: B006
    online: bool | None = None,
    model: Annotated[str | None, Query(max_length=128, description="devices reporting this model")] = None,
    version: Annotated[str | None, Query(max_length=64, description="...running this version of it")] = None,
    include_decommissioned: bool = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[DevicePublic]:
    """List devices filtered by labels, presence and the model version they run."""
    if version is not None and model is None:
        raise InvalidInputError("filtering by version needs a model")
    rows = devices.list_devices(
        session,
        labels=_parse_labels(label),
        online=online,
        model=model,
        version=version,
        include_decommissioned=include_decommissioned,
        limit=limit,
        offset=offset,
    )
    return [device_public(d) for d in rows]


@router.get("/devices/{device_id}")
def get_device(device_id: DeviceIdPath, session: SessionDep, caller: Caller) -> DevicePublic:
    """Return a device (an API key, or the device's own token)."""
    if caller.kind == "device" and caller.id != device_id:
        raise PermissionDeniedError("a device may read only itself")
    if caller.kind == "key":
        caller.require(Role.VIEWER)
    return device_public(devices.get_device(session, device_id))


@router.patch("/devices/{device_id}/labels")
def label_device(device_id: DeviceIdPath, body: LabelsUpdate, session: SessionDep, caller: Operator) -> DevicePublic:
    """Set some labels and remove others."""
    return device_public(devices.set_labels(session, device_id, body.set, body.remove, actor=caller.actor))


@router.post("/devices/{device_id}/decommission")
def decommission_device(
    device_id: DeviceIdPath,
    request: Request,
    session: SessionDep,
    caller: Operator,
    broker: BrokerDep,
    messaging: MessagingDep,
) -> DevicePublic:
    """Revoke a device's HTTP token and MQTT login (or certificate) at once, and drop its live connection."""
    revoker: devices.CertificateRevoker | None = getattr(request.app.state, "certificate_revocation", None)
    device = devices.decommission(
        session, device_id, actor=caller.actor, broker=broker, messaging=messaging, revoker=revoker
    )
    return device_public(device)


@router.put("/devices/{device_id}/models/{name}")
def deploy_model(
    device_id: DeviceIdPath,
    name: ModelNamePath,
    body: DeployRequest,
    session: SessionDep,
    settings: SettingsDep,
    caller: Operator,
    messaging: MessagingDep,
) -> DesiredState:
    """Make a device run a version (or alias) of a model; returns the new desired state."""
    return devices.deploy_model(
        session, settings, device_id, name, body.version, actor=caller.actor, messaging=messaging
    )


@router.delete("/devices/{device_id}/models/{name}")
def undeploy_model(
    device_id: DeviceIdPath, name: ModelNamePath, session: SessionDep, caller: Operator, messaging: MessagingDep
) -> DesiredState:
    """Remove a model from a device's desired state."""
    return devices.undeploy_model(session, device_id, name, actor=caller.actor, messaging=messaging)


@router.put("/devices/{device_id}/config")
def set_config(
    device_id: DeviceIdPath, body: ConfigUpdate, session: SessionDep, caller: Operator, messaging: MessagingDep
) -> DesiredState:
    """Set the agent settings in a device's desired state; returns the new desired state."""
    return devices.update_desired(session, device_id, {}, actor=caller.actor, messaging=messaging, config=body.config)
