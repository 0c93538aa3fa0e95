"""Captured hard examples: devices upload them; operators list, label, delete, export and import them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub import datasets
from hub.api.deps import Caller, DeviceIdPath, ModelNamePath, Operator, SettingsDep, Viewer
from hub.db import SessionDep
from hub.errors import InvalidInputError, PayloadTooLargeError, PermissionDeniedError
from hub.models import CapturedItem
from shared.capture import CaptureBatch, CaptureResult

router = APIRouter(tags=["datasets"])

MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_IMPORT_BYTES = 32 * 1024 * 1024


class ItemPublic(BaseModel):
    """One captured item as the API shows it (its raw input is at `.../content`)."""

    id: str
    model: str
    version: str
    device_id: str
    reason: str
    content_type: str
    size: int
    prediction: str | None
    outputs: dict[str, Any]
    label: str | None
    labelled_by: str | None
    labelled_at: datetime | None
    captured_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, row: CapturedItem) -> ItemPublic:
        """Build from a row."""
        return cls.model_validate(row, from_attributes=True)


class ItemPage(BaseModel):
    """One page of items and how many match in all."""

    items: list[ItemPublic]
    total: int


class LabelUpdate(BaseModel):
    """The label to give an item (null clears it)."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(max_length=256)


async def _batch_body(request: Request) -> bytes:
    """Read the upload with a bound: refuse past MAX_BATCH_BYTES without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BATCH_BYTES:
        raise PayloadTooLargeError(f"a capture batch is at most {MAX_BATCH_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BATCH_BYTES:
            raise PayloadTooLargeError(f"a capture batch is at most {MAX_BATCH_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/devices/{device_id}/captures", response_model=CaptureResult)
def upload_captures(
    device_id: DeviceIdPath,
    caller: Caller,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    body: Annotated[bytes, Depends(_batch_body)],
) -> CaptureResult:
    """Store a device's captured items (device token only; resending a batch stores nothing twice)."""
    counters: datasets.CaptureCounters = request.app.state.capture_counters
    if caller.kind != "device":
        raise PermissionDeniedError("captured items are uploaded with a device token")
    try:
        batch = CaptureBatch.model_validate_json(body)
    except ValidationError as exc:
        counters.counts["refused:malformed"] += 1
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInputError(f"not a capture batch: {where}: {first['msg']}") from None
    result = datasets.store_batch(session, settings, device_id, caller.id, batch)
    counters.add(result)
    return result


@router.get("/datasets/{model}/items", response_model=ItemPage)
def list_items(
    model: ModelNamePath,
    _: Viewer,
    session: SessionDep,
    labelled: bool | None = None,
    reason: Annotated[str | None, Query(max_length=32)] = None,
    device_id: Annotated[str | None, Query(max_length=128)] = None,
    version: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ItemPage:
    """List a model's captured items, newest first, filtered."""
    rows, total = datasets.list_items(
        session,
        model,
        labelled=labelled,
        reason=reason,
        device_id=device_id,
        version=version,
        limit=limit,
        offset=offset,
    )
    return ItemPage(items=[ItemPublic.of(r) for r in rows], total=total)


@router.get("/datasets/{model}/items/{item_id}", response_model=ItemPublic)
def get_item(model: ModelNamePath, item_id: str, _: Viewer, session: SessionDep) -> ItemPublic:
    """Return one item."""
    return ItemPublic.of(datasets.get_item(session, model, item_id))


@router.get("/datasets/{model}/items/{item_id}/content")
def item_content(model: ModelNamePath, item_id: str, _: Viewer, session: SessionDep, settings: SettingsDep) -> Response:
    """Return an item's raw input exactly as the device received it."""
    row = datasets.get_item(session, model, item_id)
    return Response(datasets.item_content(settings, row), media_type=row.content_type)


@router.put("/datasets/{model}/items/{item_id}/label", response_model=ItemPublic)
def label_item(
    model: ModelNamePath, item_id: str, body: LabelUpdate, caller: Operator, session: SessionDep
) -> ItemPublic:
    """Label an item (one of the model's classes when it has classes)."""
    return ItemPublic.of(datasets.label_item(session, model, item_id, body.label, actor=caller.actor))


@router.delete("/datasets/{model}/items/{item_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_item(
    model: ModelNamePath, item_id: str, caller: Operator, session: SessionDep, settings: SettingsDep
) -> None:
    """Delete an item and its stored input."""
    datasets.delete_item(session, settings, model, item_id, actor=caller.actor)


@router.get("/datasets/{model}/export")
def export_items(
    model: ModelNamePath, _: Viewer, session: SessionDep, settings: SettingsDep, labelled_only: bool = False
) -> Response:
    """Download a zip of the items (items.jsonl, items.csv and files/<id>) for an outside labelling tool."""
    data = datasets.export_items(session, settings, model, labelled_only=labelled_only)
    return Response(
        data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{model}-captured.zip"'},
    )


@router.post("/datasets/{model}/import")
async def import_labels(
    model: ModelNamePath, caller: Operator, request: Request, file: Annotated[UploadFile, File()]
) -> dict[str, int]:
    """Apply labels from a JSONL or CSV file with `id` and `label` (all or nothing)."""
    data = await file.read(MAX_IMPORT_BYTES + 1)
    if len(data) > MAX_IMPORT_BYTES:
        raise PayloadTooLargeError(f"a label file is at most {MAX_IMPORT_BYTES} bytes")
    with request.app.state.session_factory() as session:
        return datasets.import_labels(session, model, data, file.filename or "labels.jsonl", actor=caller.actor)
