"""The registry: upload, duplicate and mismatched versions, aliases, lineage, signed manifests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlmodel import select

from hub import registry
from hub.models import Artifact, ModelVersion
from shared.manifest import SignedManifest, load_public_key, verify_manifest
from tests.support.hub_app import Hub, build_version, make_hub, upload


def _blobs(hub: Hub) -> list[Path]:
    return [p for p in hub.settings.artifacts.rglob("*") if p.is_file() and ".tmp" not in p.parts]


def test_upload_registers_a_version_whose_manifest_verifies_with_the_enrollment_key(hub: Hub, tmp_path: Path) -> None:
    built = build_version(tmp_path / "build")
    operator = hub.new_key("operator")

    response = upload(hub, built, key=operator)

    assert response.status_code == 201, response.text
    version = response.json()
    assert version["version"] == "1.0.0" and version["status"] == "active"
    assert {a["sha256"] for a in version["artifacts"]} == {v.sha256 for v in built.manifest.variants}
    assert version["manifest_url"] == "http://hub.test/models/digits/versions/1.0.0/manifest"
    device = hub.enrolled_device(name="d")
    raw = hub.request("GET", "/models/digits/versions/1.0.0/manifest", key=device["device_token"])
    assert raw.status_code == 200
    assert hashlib.sha256(raw.content).hexdigest() == version["manifest_sha256"]
    manifest = verify_manifest(raw.content, load_public_key(device["signing_public_key"]))
    assert manifest == built.manifest


def test_a_duplicate_version_is_409_and_changes_nothing(hub: Hub, tmp_path: Path) -> None:
    assert upload(hub, build_version(tmp_path / "a")).status_code == 201
    first_manifest = hub.request("GET", "/models/digits/versions/1.0.0/manifest").content

    again = upload(hub, build_version(tmp_path / "b"))

    assert again.status_code == 409
    assert hub.request("GET", "/models/digits/versions/1.0.0/manifest").content == first_manifest
    assert len(_blobs(hub)) == 2


def test_a_file_that_differs_from_its_manifest_leaves_nothing_behind(hub: Hub, tmp_path: Path) -> None:
    built = build_version(tmp_path / "build")
    first, second = built.files.values()
    second.write_bytes(b"tampered" + second.read_bytes()[8:])

    response = upload(hub, built)

    assert response.status_code == 422
    assert "sha256" in response.json()["detail"]
    assert hub.request("GET", "/models/digits/versions/1.0.0").status_code == 404
    assert _blobs(hub) == []  # the good first file was rolled back with the rest
    with hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert session.exec(select(ModelVersion)).all() == []
        assert session.exec(select(Artifact)).all() == []


def test_missing_and_extra_files_are_refused(sqlite_hub: Hub, tmp_path: Path) -> None:
    built = build_version(tmp_path / "build")
    name = next(iter(built.files))
    missing = type(built)(built.manifest, {k: v for k, v in built.files.items() if k != name})
    assert upload(sqlite_hub, missing).status_code == 422
    extra_path = tmp_path / "extra.bin"
    extra_path.write_bytes(b"x")
    extra = type(built)(built.manifest, {**built.files, "extra.bin": extra_path})
    assert upload(sqlite_hub, extra).status_code == 422


def test_an_invalid_manifest_is_a_422_naming_the_field(sqlite_hub: Hub) -> None:
    files = [("manifest", ("manifest.json", b'{"name": "digits", "version": "one"}', "application/json"))]
    response = sqlite_hub.request("POST", "/models/digits/versions", files=files)
    assert response.status_code == 422
    fields = {tuple(err["loc"]) for err in response.json()["detail"]}
    assert ("body", "manifest", "version") in fields


def test_an_oversized_upload_is_refused(tmp_path: Path) -> None:
    for hub in make_hub(tmp_path, f"sqlite:///{tmp_path / 'hub.db'}", max_upload_bytes=100_000):
        response = upload(hub, build_version(tmp_path / "build", size=150_000))
        assert response.status_code == 413
        assert hub.request("GET", "/models/digits").status_code == 404


def test_aliases_latest_stable_custom_and_deprecation(hub: Hub, tmp_path: Path) -> None:
    for version in ("1.0.0", "1.1.0-rc.1", "1.1.0", "0.9.0"):
        assert upload(hub, build_version(tmp_path / version, version=version, size=1000)).status_code == 201

    assert hub.request("GET", "/models/digits").json()["aliases"] == {"latest": "1.1.0"}
    assert hub.request("PUT", "/models/digits/aliases/stable", json={"version": "1.0.0"}).status_code == 200
    assert hub.request("PUT", "/models/digits/aliases/canary", json={"version": "latest"}).status_code == 200
    assert hub.request("PUT", "/models/digits/aliases/latest", json={"version": "1.0.0"}).status_code == 422
    assert hub.request("PUT", "/models/digits/aliases/stable", json={"version": "9.9.9"}).status_code == 404
    assert hub.request("GET", "/models/digits/versions/stable").json()["version"] == "1.0.0"

    assert hub.request("POST", "/models/digits/versions/1.1.0/deprecate").json()["status"] == "deprecated"

    model = hub.request("GET", "/models/digits").json()
    assert model["versions"] == ["1.1.0", "1.1.0-rc.1", "1.0.0", "0.9.0"]
    assert model["aliases"] == {"latest": "1.1.0-rc.1", "stable": "1.0.0", "canary": "1.1.0"}
    device = hub.enrolled_device()
    deploy = hub.request("PUT", f"/devices/{device['device_id']}/models/digits", json={"version": "1.1.0"})
    assert deploy.status_code == 409  # deprecated versions are not deployed


def test_lineage_follows_parent_versions(sqlite_hub: Hub, tmp_path: Path) -> None:
    upload(sqlite_hub, build_version(tmp_path / "a", version="1.0.0", size=100))
    upload(sqlite_hub, build_version(tmp_path / "b", version="1.1.0", size=100, parent="1.0.0"))
    upload(sqlite_hub, build_version(tmp_path / "c", version="2.0.0", size=100, parent="1.1.0"))

    chain = sqlite_hub.request("GET", "/models/digits/versions/2.0.0/lineage").json()

    assert [v["version"] for v in chain] == ["2.0.0", "1.1.0", "1.0.0"]
    assert chain[0]["dataset_hash"] == "sha256:abc"


def test_publish_version_is_the_same_path_for_the_build_pipeline(sqlite_hub: Hub, tmp_path: Path) -> None:
    built = build_version(tmp_path / "build", name="direct")
    with sqlite_hub.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        row = registry.publish_version(session, sqlite_hub.settings, built.manifest, built.files, actor="build")
        with pytest.raises(registry.DuplicateVersionError):
            registry.publish_version(session, sqlite_hub.settings, built.manifest, built.files)
    signed = SignedManifest.model_validate_json(row.signed_manifest)
    assert signed.manifest.name == "direct"
    listed = sqlite_hub.request("GET", "/models/direct/versions").json()
    assert [v["published_by"] for v in listed] == ["build"]


def test_unknown_things_are_404(sqlite_hub: Hub) -> None:
    assert sqlite_hub.request("GET", "/models/nope").status_code == 404
    assert sqlite_hub.request("GET", "/models/nope/versions/1.0.0/manifest").status_code == 404
    assert sqlite_hub.request("GET", "/devices/nope").status_code == 404
    assert sqlite_hub.request("GET", "/artifacts/" + "0" * 64).status_code == 404
