"""Artifact downloads: resumable with Range, cacheable with ETag, closed to decommissioned devices."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support.hub_app import Hub, build_version, upload


def _published(hub: Hub, tmp_path: Path) -> tuple[str, bytes]:
    built = build_version(tmp_path / "build", size=1_000_000)
    assert upload(hub, built).status_code == 201
    variant = built.manifest.variants[0]
    return variant.sha256, built.files[variant.file].read_bytes()


def test_an_interrupted_download_resumes_with_range_to_the_right_sha256(hub: Hub, tmp_path: Path) -> None:
    sha, data = _published(hub, tmp_path)
    token = hub.enrolled_device()["device_token"]
    received = bytearray()
    # The first attempt dies after ~300 kB: read a streamed response partly, then drop it.
    with hub.client.stream("GET", f"/artifacts/{sha}", headers=hub.headers(token)) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(data))
        for chunk in response.iter_bytes():
            received += chunk
            if len(received) >= 300_000:
                break
    assert 0 < len(received) < len(data)

    resumed = hub.request("GET", f"/artifacts/{sha}", key=token, headers={"Range": f"bytes={len(received)}-"})

    assert resumed.status_code == 206
    assert resumed.headers["content-range"] == f"bytes {len(received)}-{len(data) - 1}/{len(data)}"
    received += resumed.content
    assert hashlib.sha256(received).hexdigest() == sha


def test_etag_if_none_match_and_ranges(hub: Hub, tmp_path: Path) -> None:
    sha, data = _published(hub, tmp_path)
    full = hub.request("GET", f"/artifacts/{sha}")
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"' and full.headers["accept-ranges"] == "bytes"

    cached = hub.request("GET", f"/artifacts/{sha}", headers={"If-None-Match": full.headers["etag"]})
    assert cached.status_code == 304 and cached.content == b""
    assert hub.request("GET", f"/artifacts/{sha}", headers={"If-None-Match": '"other"'}).status_code == 200

    tail = hub.request("GET", f"/artifacts/{sha}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    middle = hub.request("GET", f"/artifacts/{sha}", headers={"Range": "bytes=10-19"})
    assert middle.content == data[10:20]
    outside = hub.request("GET", f"/artifacts/{sha}", headers={"Range": f"bytes={len(data)}-"})
    assert outside.status_code == 416 and outside.headers["content-range"] == f"bytes */{len(data)}"
    stale = hub.request("GET", f"/artifacts/{sha}", headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and len(stale.content) == len(data)  # changed: whole file
    head = hub.request("HEAD", f"/artifacts/{sha}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""


def test_a_decommissioned_device_can_no_longer_download(hub: Hub, tmp_path: Path) -> None:
    sha, _ = _published(hub, tmp_path)
    device = hub.enrolled_device(name="gone")
    token = device["device_token"]
    assert hub.request("GET", f"/artifacts/{sha}", key=token).status_code == 200

    decommissioned = hub.request("POST", f"/devices/{device['device_id']}/decommission", key=hub.new_key("operator"))

    assert decommissioned.status_code == 200 and decommissioned.json()["decommissioned"] is True
    assert hub.request("GET", f"/artifacts/{sha}", key=token).status_code == 401
    assert hub.request("GET", "/models/digits/versions/1.0.0/manifest", key=token).status_code == 401
    assert [d["id"] for d in hub.request("GET", "/devices").json()] == []
    listed = hub.request("GET", "/devices", params={"include_decommissioned": True}).json()
    assert [d["id"] for d in listed] == [device["device_id"]]
