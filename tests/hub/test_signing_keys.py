"""Signing-key rotation at the hub: the chain it serves, who may rotate and retire, re-signing on retirement."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.keys import KeyChain, TrustedKeys
from shared.manifest import SignedManifest, generate_signing_key
from tests.support.hub_app import Hub, build_version, upload


def _chain(hub: Hub, key: str | None = None) -> KeyChain:
    response = hub.request("GET", "/signing-keys", key=key)
    assert response.status_code == 200, response.text
    return KeyChain.model_validate_json(response.content)


def _signer(hub: Hub, version: str) -> str:
    return SignedManifest.from_bytes(hub.request("GET", f"/models/digits/versions/{version}/manifest").content).key_id


def test_a_device_enrolled_before_two_rotations_follows_the_chain_the_hub_serves(sqlite_hub: Hub) -> None:
    device = sqlite_hub.enrolled_device(name="d")
    first = _chain(sqlite_hub, device["device_token"]).current
    rotated = [sqlite_hub.request("POST", "/signing-keys/rotate") for _ in range(2)]
    assert [r.status_code for r in rotated] == [201, 201]
    second, third = (r.json()["key_id"] for r in rotated)
    chain = _chain(sqlite_hub, device["device_token"])
    assert chain.current == third and [e.key_id for e in chain.endorsements] == [second, third]
    trusted, problems = TrustedKeys.enrolled(device["signing_public_key"]).extend(chain)
    assert problems == [] and set(trusted.keys) == {first, second, third}
    # A device enrolled now gets the current key.
    assert sqlite_hub.enrolled_device(name="e")["signing_public_key"] == chain.current_public_key
    listed = sqlite_hub.request("GET", "/signing-keys/summary").json()
    assert [(k["key_id"], k["state"]) for k in listed] == [(first, "valid"), (second, "valid"), (third, "current")]


def test_only_admins_rotate_and_retire_and_the_current_key_is_not_retired(sqlite_hub: Hub) -> None:
    device = sqlite_hub.enrolled_device(name="d")
    operator = sqlite_hub.new_key("operator")
    first = _chain(sqlite_hub).current
    assert sqlite_hub.request("POST", "/signing-keys/rotate", key=operator).status_code == 403
    assert sqlite_hub.request("POST", "/signing-keys/rotate", key=device["device_token"]).status_code == 403
    assert sqlite_hub.request("GET", "/signing-keys/summary", key=device["device_token"]).status_code == 403
    current = sqlite_hub.request("POST", f"/signing-keys/{first}/retire")
    assert current.status_code == 409 and "rotate first" in current.json()["detail"]
    assert sqlite_hub.request("POST", f"/signing-keys/{'0' * 16}/retire").status_code == 404
    sqlite_hub.request("POST", "/signing-keys/rotate")
    assert sqlite_hub.request("POST", f"/signing-keys/{first}/retire", key=operator).status_code == 403
    assert _chain(sqlite_hub).retirements == []


def test_a_key_file_outside_the_chain_is_not_rotated_from(sqlite_hub: Hub) -> None:
    _chain(sqlite_hub)  # records the first key
    sqlite_hub.settings.signing_key.write_bytes(generate_signing_key())
    refused = sqlite_hub.request("POST", "/signing-keys/rotate")
    assert refused.status_code == 409 and "not in the key chain" in refused.json()["detail"]


def test_retiring_re_signs_what_the_old_key_signed_and_moves_desired_states(hub: Hub, tmp_path: Path) -> None:
    assert upload(hub, build_version(tmp_path / "a", version="1.0.0")).status_code == 201
    device = hub.enrolled_device(name="d")
    deployed = hub.request("PUT", f"/devices/{device['device_id']}/models/digits", json={"version": "1.0.0"})
    before = deployed.json()
    old = hub.request("GET", "/models/digits/versions/1.0.0/manifest").content
    first = SignedManifest.from_bytes(old).key_id
    second = hub.request("POST", "/signing-keys/rotate").json()["key_id"]
    assert upload(hub, build_version(tmp_path / "b", version="2.0.0")).status_code == 201
    assert (_signer(hub, "1.0.0"), _signer(hub, "2.0.0")) == (first, second)  # old manifests stay as they were

    retired = hub.request("POST", f"/signing-keys/{first}/retire")
    assert retired.status_code == 200, retired.text
    assert retired.json()["resigned"] == ["digits@1.0.0"] and retired.json()["devices"] == 1
    new = hub.request("GET", "/models/digits/versions/1.0.0/manifest").content
    assert SignedManifest.from_bytes(new).key_id == second
    assert SignedManifest.from_bytes(new).manifest == SignedManifest.from_bytes(old).manifest
    desired = hub.request("GET", f"/devices/{device['device_id']}").json()["desired"]
    assert desired["revision"] == before["revision"] + 1
    assert desired["models"]["digits"]["manifest_sha256"] == hashlib.sha256(new).hexdigest()
    # The chain tells devices; the key is refused by a device that follows it.
    trusted, _ = TrustedKeys.enrolled(device["signing_public_key"]).extend(_chain(hub, device["device_token"]))
    assert trusted.retired == [first] and trusted.verify(new).version == "1.0.0"
    # Retiring again changes nothing; the audit log has both changes once.
    again = hub.request("POST", f"/signing-keys/{first}/retire").json()
    assert again["resigned"] == [] and again["devices"] == 0
    actions = [e["action"] for e in hub.request("GET", "/audit").json() if e["action"].startswith("signing_key.")]
    assert actions == ["signing_key.retire", "signing_key.rotate"]
    # No private key is kept but the current one.
    assert sorted(p.name for p in hub.settings.signing_key.parent.glob("*.pem*")) == ["signing_key.pem"]
