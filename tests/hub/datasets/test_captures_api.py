"""Captured items over the real API: idempotent upload by device, filters, labels, delete, export, import."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hub.datasets.items import captures_dir
from shared.capture import MAX_ITEM_BYTES, CaptureBatch, CaptureItem, CaptureReason, item_id
from tests.support.hub_app import Hub, build_version, upload


def _item(content: bytes, *, model: str = "digits", version: str = "1.0.0", guess: str = "3") -> CaptureItem:
    return CaptureItem(
        id=item_id(content, model, version),
        model=model,
        version=version,
        reason=CaptureReason.LOW_CONFIDENCE,
        content_b64=base64.b64encode(content).decode(),
        outputs={"top": [{"class": guess, "score": 0.41}, {"class": "8", "score": 0.39}]},
        captured_at=datetime.now(UTC),
    )


def _post(hub: Hub, device: dict[str, Any], items: list[CaptureItem], device_id: str | None = None) -> Any:
    batch = CaptureBatch(device_id=device["device_id"], items=items)
    return hub.request(
        "POST",
        f"/devices/{device_id or device['device_id']}/captures",
        key=device["device_token"],
        content=batch.model_dump_json(),
        headers={"Content-Type": "application/json"},
    )


def _setup(hub: Hub, tmp_path: Path) -> dict[str, Any]:
    built = build_version(tmp_path / "v1", "digits", "1.0.0")
    built = type(built)(built.manifest.model_copy(update={"labels": [str(i) for i in range(10)]}), built.files)
    assert upload(hub, built).status_code == 201
    return hub.enrolled_device(name="cam-1")


def test_a_device_uploads_once_and_a_resent_batch_stores_nothing_twice(hub: Hub, tmp_path: Path) -> None:
    device = _setup(hub, tmp_path)
    items = [_item(json.dumps({"data": [i] * 64}).encode()) for i in range(3)]
    first = _post(hub, device, items)
    assert first.status_code == 200, first.text
    assert sorted(first.json()["stored"]) == sorted(i.id for i in items)
    again = _post(hub, device, items)
    assert again.json()["stored"] == [] and sorted(again.json()["duplicates"]) == sorted(i.id for i in items)
    page = hub.request("GET", "/datasets/digits/items").json()
    assert page["total"] == 3
    assert {row["device_id"] for row in page["items"]} == {device["device_id"]}
    assert {row["prediction"] for row in page["items"]} == {"3"}
    one = items[0]
    content = hub.request("GET", f"/datasets/digits/items/{one.id}/content")
    assert content.content == base64.b64decode(one.content_b64)
    metrics = hub.request("GET", "/metrics").text
    assert 'autodl_hub_captured_items_total{outcome="stored"} 3.0' in metrics
    assert 'autodl_hub_captured_items_total{outcome="duplicate"} 3.0' in metrics


def test_bad_items_are_refused_with_a_reason_and_counted(hub: Hub, tmp_path: Path) -> None:
    device = _setup(hub, tmp_path)
    good = _item(b'{"data": [1]}')
    wrong_hash = good.model_copy(update={"id": "0" * 64})
    unknown = _item(b'{"data": [2]}', model="nope")
    too_big_content = b"x" * (MAX_ITEM_BYTES + 1)
    too_big = _item(too_big_content).model_copy(update={"content_b64": base64.b64encode(too_big_content).decode()})
    result = _post(hub, device, [good, wrong_hash, unknown]).json()
    assert result["stored"] == [good.id]
    assert result["refused"][wrong_hash.id].startswith("hash_mismatch")
    assert result["refused"][unknown.id].startswith("unknown_model")
    over = _post(hub, device, [too_big]).json()
    assert over["refused"][too_big.id].startswith("too_large")
    # A body past the batch limit is refused before it is read, and not echoed.
    huge = b'{"device_id": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    response = hub.request(
        "POST",
        f"/devices/{device['device_id']}/captures",
        key=device["device_token"],
        content=huge,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413 and "xxxx" not in response.text
    malformed = hub.request(
        "POST",
        f"/devices/{device['device_id']}/captures",
        key=device["device_token"],
        content=b'{"device_id": "' + b"y" * 5000 + b'", "items": 3}',
        headers={"Content-Type": "application/json"},
    )
    assert malformed.status_code == 422 and "yyyy" not in malformed.text
    metrics = hub.request("GET", "/metrics").text
    assert 'autodl_hub_captured_items_total{outcome="refused:hash_mismatch"} 1.0' in metrics
    assert 'autodl_hub_captured_items_total{outcome="refused:unknown_model"} 1.0' in metrics
    assert 'autodl_hub_captured_items_total{outcome="refused:too_large"} 1.0' in metrics
    assert 'autodl_hub_captured_items_total{outcome="refused:malformed"} 1.0' in metrics


def test_only_the_device_itself_uploads_its_items(hub: Hub, tmp_path: Path) -> None:
    device = _setup(hub, tmp_path)
    other = hub.enrolled_device(name="cam-2")
    items = [_item(b'{"data": [5]}')]
    assert _post(hub, other, items, device_id=device["device_id"]).status_code == 403
    as_key = hub.request(
        "POST",
        f"/devices/{device['device_id']}/captures",
        content=CaptureBatch(device_id=device["device_id"], items=items).model_dump_json(),
        headers={"Content-Type": "application/json"},
    )
    assert as_key.status_code == 403
    assert hub.request("POST", f"/devices/{device['device_id']}/captures", content=b"{}").status_code == 403
    decommission = hub.request("POST", f"/devices/{device['device_id']}/decommission")
    assert decommission.status_code in (200, 204)
    assert _post(hub, device, items).status_code == 401
    assert hub.request("GET", "/datasets/digits/items").json()["total"] == 0


def test_labels_filters_delete_export_and_import(hub: Hub, tmp_path: Path) -> None:
    device = _setup(hub, tmp_path)
    items = [_item(json.dumps({"data": [i]}).encode()) for i in range(4)]
    assert _post(hub, device, items).status_code == 200
    a, b, c, d = (i.id for i in items)
    assert hub.request("PUT", f"/datasets/digits/items/{a}/label", json={"label": "7"}).json()["label"] == "7"
    refused = hub.request("PUT", f"/datasets/digits/items/{b}/label", json={"label": "cat"})
    assert refused.status_code == 422 and "not a class" in refused.text
    viewer = hub.new_key("viewer")
    assert hub.request("PUT", f"/datasets/digits/items/{b}/label", key=viewer, json={"label": "1"}).status_code == 403
    labelled = hub.request("GET", "/datasets/digits/items", params={"labelled": "true"}).json()
    assert [row["id"] for row in labelled["items"]] == [a]
    assert hub.request("GET", "/datasets/digits/items", params={"labelled": "false"}).json()["total"] == 3

    # Delete removes the row and the stored file.
    row = hub.request("GET", f"/datasets/digits/items/{d}").json()
    files_before = sorted(p.name for p in captures_dir(hub.settings).rglob("*") if p.is_file())
    assert hub.request("DELETE", f"/datasets/digits/items/{d}").status_code == 204
    assert hub.request("GET", f"/datasets/digits/items/{d}").status_code == 404
    files_after = sorted(p.name for p in captures_dir(hub.settings).rglob("*") if p.is_file())
    assert len(files_after) == len(files_before) - 1 and row["id"]

    # Export: every item with its file; import labels from a CSV an outside tool wrote.
    exported = zipfile.ZipFile(io.BytesIO(hub.request("GET", "/datasets/digits/export").content))
    lines = [json.loads(x) for x in exported.read("items.jsonl").decode().splitlines()]
    assert {x["id"] for x in lines} == {a, b, c}
    assert exported.read(f"files/{b}") == base64.b64decode(items[1].content_b64)
    csv_text = f"id,label\n{b},1\n{c},2\n"
    imported = hub.request("POST", "/datasets/digits/import", files={"file": ("labels.csv", csv_text, "text/csv")})
    assert imported.status_code == 200, imported.text
    assert imported.json() == {"labelled": 2, "cleared": 0}
    bad = json.dumps({"id": a, "label": "0"}) + "\n" + json.dumps({"id": "f" * 64, "label": "1"}) + "\n"
    refused_import = hub.request(
        "POST", "/datasets/digits/import", files={"file": ("labels.jsonl", bad, "application/x-ndjson")}
    )
    assert refused_import.status_code == 422 and "line 2" in refused_import.text
    assert hub.request("GET", f"/datasets/digits/items/{a}").json()["label"] == "7"  # all or nothing
    assert hub.request("GET", "/datasets/digits/items", params={"labelled": "true"}).json()["total"] == 3
