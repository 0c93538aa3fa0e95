"""The artifact cache against a real HTTP server: Range resume, sha256 and signature checks."""

from __future__ import annotations

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.artifacts import ArtifactCache, Verifier, fetch_manifest, verify_signed
from agent.errors import DesiredStateError, DiskSpaceError, VerificationError
from shared.manifest import public_key_b64
from tests.support.hubstub import HubStub
from tests.support.models import make_release


def test_a_partial_download_resumes_with_range(hub_stub: HubStub, cache: ArtifactCache, client: httpx.Client) -> None:
    release = make_release(hub_stub.key, "m", "1.0.0", seed=1, padding_bytes=50_000)
    hub_stub.publish(release)
    data = release.files[release.sha256]
    cache.part_path(release.sha256).write_bytes(data[:12_345])
    path = cache.download(client, f"{hub_stub.url}/artifacts/{release.sha256}", release.sha256, len(data))
    assert path.read_bytes() == data
    assert hub_stub.ranges == ["bytes=12345-"]
    assert not cache.part_path(release.sha256).exists()
    # Cached: no second transfer.
    cache.download(client, f"{hub_stub.url}/artifacts/{release.sha256}", release.sha256, len(data))
    assert len(hub_stub.ranges) == 1


def test_a_corrupted_artifact_is_refused_and_never_cached(
    hub_stub: HubStub, cache: ArtifactCache, client: httpx.Client
) -> None:
    release = make_release(hub_stub.key, "m", "1.0.0", seed=1)
    data = release.files[release.sha256]
    hub_stub.artifacts[release.sha256] = bytes([data[0] ^ 0xFF]) + data[1:]
    with pytest.raises(VerificationError, match="sha256"):
        cache.download(client, f"{hub_stub.url}/artifacts/{release.sha256}", release.sha256, len(data))
    assert not cache.path(release.sha256).exists() and not cache.part_path(release.sha256).exists()


def test_missing_artifact_and_full_disk_are_refused(
    hub_stub: HubStub, cache: ArtifactCache, client: httpx.Client
) -> None:
    with pytest.raises(DesiredStateError, match="404"):
        cache.download(client, f"{hub_stub.url}/artifacts/{'0' * 64}", "0" * 64, 10)
    with pytest.raises(DiskSpaceError, match="not enough disk"):
        cache.download(client, f"{hub_stub.url}/artifacts/{'1' * 64}", "1" * 64, 1 << 60)


def test_a_cached_file_that_rotted_fails_verification(
    hub_stub: HubStub, cache: ArtifactCache, client: httpx.Client
) -> None:
    release = make_release(hub_stub.key, "m", "1.0.0", seed=1)
    hub_stub.publish(release)
    data = release.files[release.sha256]
    path = cache.download(client, f"{hub_stub.url}/artifacts/{release.sha256}", release.sha256, len(data))
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(VerificationError):
        cache.verify(release.sha256, len(data))
    assert not path.exists()


def _key(key: Ed25519PrivateKey) -> Verifier:
    return lambda data, sha256, source: verify_signed(data, public_key_b64(key), sha256, source)


def test_manifest_signature_is_checked_with_the_enrollment_key(hub_stub: HubStub, client: httpx.Client) -> None:
    release = make_release(hub_stub.key, "m", "1.0.0", seed=1)
    desired = hub_stub.publish(release)
    manifest, raw = fetch_manifest(client, desired.manifest_url, _key(hub_stub.key))
    assert manifest == release.manifest and raw == release.signed.to_bytes()
    with pytest.raises(VerificationError, match="signed by key"):
        fetch_manifest(client, desired.manifest_url, _key(Ed25519PrivateKey.generate()))
    tampered = release.signed.model_copy(update={"manifest": release.manifest.model_copy(update={"task": "x"})})
    hub_stub.manifests[("m", "1.0.0")] = tampered.to_bytes()
    with pytest.raises(VerificationError, match="bad signature"):
        fetch_manifest(client, desired.manifest_url, _key(hub_stub.key))
    hub_stub.manifests[("m", "1.0.0")] = b"{not json"
    with pytest.raises(VerificationError, match="not JSON"):
        fetch_manifest(client, desired.manifest_url, _key(hub_stub.key))
