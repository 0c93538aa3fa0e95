"""Captured items: a device's batch stored once, listed, labelled, deleted, exported and imported.

An item's raw input is a file in `<artifact dir>/captures/` named by its sha256 (the content
address); the row holds who sent it, which version answered what, why it was kept, and the
label an operator (or an outside labelling tool, through import) gave it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import os
import threading
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, func, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from hub.models import CapturedItem, Device, Model, ModelVersion, utcnow
from shared.capture import MAX_ITEM_BYTES, CaptureBatch, CaptureResult, item_id

__all__ = [
    "CaptureCounters",
    "UnknownItemError",
    "captures_dir",
    "delete_item",
    "export_items",
    "get_item",
    "import_labels",
    "item_content",
    "label_item",
    "list_items",
    "store_batch",
]

MAX_LABEL = 256


class UnknownItemError(NotFoundError):
    """No captured item with that id for that model."""


class CaptureCounters:
    """Uploaded items by outcome (stored, duplicate, refused:<reason>), for /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, result: CaptureResult) -> None:
        """Count one batch's outcome."""
        with self._lock:
            self.counts["stored"] += len(result.stored)
            self.counts["duplicate"] += len(result.duplicates)
            for reason in result.refused.values():
                self.counts["refused:" + reason.split(":", 1)[0]] += 1

    def snapshot(self) -> dict[str, int]:
        """Return a copy of the counts."""
        with self._lock:
            return dict(self.counts)


def captures_dir(settings: HubSettings) -> Path:
    """Return the folder that holds captured inputs."""
    return settings.artifacts / "captures"


def _content_path(settings: HubSettings, sha256: str) -> Path:
    return captures_dir(settings) / sha256[:2] / sha256


def _write_content(settings: HubSettings, sha256: str, data: bytes) -> None:
    path = _content_path(settings, sha256)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def store_batch(
    session: Session, settings: HubSettings, device_id: str, caller_device: str, batch: CaptureBatch
) -> CaptureResult:
    """Store a device's batch: new items stored, known ids reported as duplicates, bad items refused."""
    if caller_device != device_id or batch.device_id != device_id:
        raise PermissionDeniedError("a device uploads only its own captured items")
    device = session.get(Device, device_id)
    if device is None or device.decommissioned:
        raise PermissionDeniedError(f"device {device_id} is not enrolled")
    stored: list[str] = []
    duplicates: list[str] = []
    refused: dict[str, str] = {}
    versions: dict[tuple[str, str], bool] = {}
    for item in batch.items:
        if item.id in stored or item.id in duplicates or item.id in refused:
            duplicates.append(item.id)
            continue
        key = (item.model, item.version)
        if key not in versions:
            versions[key] = (
                session.exec(
                    select(ModelVersion.id)
                    .join(Model, col(Model.id) == col(ModelVersion.model_id))
                    .where(Model.name == item.model, ModelVersion.version == item.version)
                ).first()
                is not None
            )
        if not versions[key]:
            refused[item.id] = f"unknown_model: no version {item.version} of model {item.model!r}"
            continue
        try:
            content = base64.b64decode(item.content_b64, validate=True)
        except (binascii.Error, ValueError):
            refused[item.id] = "malformed: content_b64 is not base64"
            continue
        if len(content) > MAX_ITEM_BYTES:
            refused[item.id] = f"too_large: {len(content)} bytes, the limit is {MAX_ITEM_BYTES}"
            continue
        if item_id(content, item.model, item.version) != item.id:
            refused[item.id] = "hash_mismatch: id is not sha256 of the content, model and version"
            continue
        if session.get(CapturedItem, item.id) is not None:
            duplicates.append(item.id)
            continue
        sha = hashlib.sha256(content).hexdigest()
        _write_content(settings, sha, content)
        top = item.outputs.get("top")
        prediction = None
        if isinstance(top, list) and top and isinstance(top[0], dict):
            prediction = str(top[0].get("class"))[:MAX_LABEL]
        session.add(
            CapturedItem(
                id=item.id,
                model=item.model,
                version=item.version,
                device_id=device_id,
                reason=item.reason.value,
                content_type=item.content_type,
                content_sha256=sha,
                size=len(content),
                outputs=item.outputs,
                prediction=prediction,
                captured_at=item.captured_at,
            )
        )
        stored.append(item.id)
    session.commit()
    return CaptureResult(stored=stored, duplicates=duplicates, refused=refused)


def list_items(
    session: Session,
    model: str,
    *,
    labelled: bool | None = None,
    reason: str | None = None,
    device_id: str | None = None,
    version: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[CapturedItem], int]:
    """Return one page of a model's items, newest first, and how many match in all."""
    query = select(CapturedItem).where(CapturedItem.model == model)
    if labelled is not None:
        query = query.where(col(CapturedItem.label).is_not(None) if labelled else col(CapturedItem.label).is_(None))
    if reason is not None:
        query = query.where(CapturedItem.reason == reason)
    if device_id is not None:
        query = query.where(CapturedItem.device_id == device_id)
    if version is not None:
        query = query.where(CapturedItem.version == version)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(
        query.order_by(col(CapturedItem.created_at).desc(), col(CapturedItem.id)).offset(offset).limit(limit)
    ).all()
    return list(rows), int(total)


def get_item(session: Session, model: str, item: str) -> CapturedItem:
    """Return one item of `model`; raise UnknownItemError."""
    row = session.get(CapturedItem, item)
    if row is None or row.model != model:
        raise UnknownItemError(f"model {model!r} has no captured item {item}")
    return row


def item_content(settings: HubSettings, row: CapturedItem) -> bytes:
    """Return an item's raw input as the device received it."""
    path = _content_path(settings, row.content_sha256)
    if not path.exists():
        raise UnknownItemError(f"the content of item {row.id} is missing from the store")
    return path.read_bytes()


def _known_labels(session: Session, model: str) -> list[str] | None:
    row = session.exec(
        select(ModelVersion)
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(Model.name == model)
        .order_by(col(ModelVersion.created_at).desc())
    ).first()
    labels = (row.manifest or {}).get("labels") if row is not None else None
    return [str(label) for label in labels] if isinstance(labels, list) else None


def _check_label(label: str | None, known: list[str] | None, model: str) -> None:
    if label is None:
        return
    if not label or len(label) > MAX_LABEL:
        raise InvalidInputError(f"a label is 1 to {MAX_LABEL} characters")
    if known is not None and label not in known:
        raise InvalidInputError(f"label {label!r} is not a class of {model}: {known}")


def label_item(session: Session, model: str, item: str, label: str | None, *, actor: str) -> CapturedItem:
    """Set (or with None clear) an item's label; labels must be classes of the model when it has any."""
    row = get_item(session, model, item)
    _check_label(label, _known_labels(session, model), model)
    row.label = label
    row.labelled_by = actor if label is not None else None
    row.labelled_at = utcnow() if label is not None else None
    session.add(row)
    record(session, actor, "dataset.label", f"{model}/{item}", label=label)
    session.commit()
    session.refresh(row)
    return row


def delete_item(session: Session, settings: HubSettings, model: str, item: str, *, actor: str) -> None:
    """Delete an item and, when no other item shares it, its file."""
    row = get_item(session, model, item)
    sha = row.content_sha256
    session.delete(row)
    record(session, actor, "dataset.delete", f"{model}/{item}")
    session.commit()
    others = session.exec(select(func.count()).where(CapturedItem.content_sha256 == sha)).one()
    if not others:
        _content_path(settings, sha).unlink(missing_ok=True)


def _public(row: CapturedItem) -> dict[str, Any]:
    return {
        "id": row.id,
        "model": row.model,
        "version": row.version,
        "device_id": row.device_id,
        "reason": row.reason,
        "content_type": row.content_type,
        "size": row.size,
        "prediction": row.prediction,
        "outputs": row.outputs,
        "label": row.label,
        "labelled_by": row.labelled_by,
        "captured_at": row.captured_at.isoformat(),
    }


def export_items(session: Session, settings: HubSettings, model: str, *, labelled_only: bool = False) -> bytes:
    """Return a zip: items.jsonl (one item a line), items.csv (id, label, prediction, file) and files/<id>."""
    rows, _ = list_items(session, model, labelled=True if labelled_only else None, limit=1_000_000)
    buffer = io.BytesIO()
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["id", "label", "prediction", "reason", "device_id", "version", "file"])
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        lines = []
        for row in rows:
            name = f"files/{row.id}"
            try:
                archive.writestr(name, item_content(settings, row))
            except UnknownItemError:
                name = ""
            lines.append(json.dumps({**_public(row), "file": name}))
            writer.writerow(
                [row.id, row.label or "", row.prediction or "", row.reason, row.device_id, row.version, name]
            )
        archive.writestr("items.jsonl", "\n".join(lines) + ("\n" if lines else ""))
        archive.writestr("items.csv", table.getvalue())
    return buffer.getvalue()


def _parse_labels(data: bytes, filename: str) -> list[tuple[int, str, str | None]]:
    """Return (line, id, label) from JSONL or CSV (with an `id` and a `label` column)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{filename}: not UTF-8") from exc
    out: list[tuple[int, str, str | None]] = []
    if filename.endswith(".csv") or text.lstrip().startswith("id,"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "id" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise InvalidInputError(f"{filename}: a CSV needs the columns id and label")
        for number, entry in enumerate(reader, start=2):
            out.append((number, (entry.get("id") or "").strip(), (entry.get("label") or "").strip() or None))
        return out
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{filename} line {number}: not JSON: {exc.msg}") from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise InvalidInputError(f"{filename} line {number}: an object with an 'id' string")
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise InvalidInputError(f"{filename} line {number}: 'label' must be a string or null")
        out.append((number, entry["id"], label or None))
    return out


def import_labels(session: Session, model: str, data: bytes, filename: str, *, actor: str) -> dict[str, int]:
    """Apply labels from an outside tool (JSONL or CSV); all or nothing: a bad line changes nothing."""
    entries = _parse_labels(data, filename)
    known = _known_labels(session, model)
    rows: list[tuple[CapturedItem, str | None]] = []
    for number, item, label in entries:
        row = session.get(CapturedItem, item)
        if row is None or row.model != model:
            raise InvalidInputError(f"{filename} line {number}: model {model!r} has no captured item {item!r}")
        try:
            _check_label(label, known, model)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{filename} line {number}: {exc}") from exc
        rows.append((row, label))
    now = utcnow()
    for row, label in rows:
        row.label, row.labelled_by, row.labelled_at = label, (actor if label else None), (now if label else None)
        session.add(row)
    record(session, actor, "dataset.import", model, items=len(rows))
    session.commit()
    return {"labelled": sum(1 for _, label in rows if label), "cleared": sum(1 for _, label in rows if not label)}
