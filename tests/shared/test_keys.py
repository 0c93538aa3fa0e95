"""The key chain: a device grows its trust only through statements the keys it trusts signed."""

from __future__ import annotations

import json

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.keys import KeyChain, KeyEndorsement, TrustedKeys, UnknownKeyError, endorse, public_key_id, retire
from shared.manifest import SignatureError, public_key_b64, sign_manifest
from tests.support.models import make_release


def _id(key: Ed25519PrivateKey) -> str:
    return public_key_id(public_key_b64(key))


def _chain(current: Ed25519PrivateKey, *statements: object) -> KeyChain:
    return KeyChain(
        current=_id(current),
        current_public_key=public_key_b64(current),
        endorsements=[s for s in statements if isinstance(s, KeyEndorsement)],
        retirements=[s for s in statements if not isinstance(s, KeyEndorsement)],
    )


def _signed(key: Ed25519PrivateKey) -> bytes:
    return make_release(key, "clf", "1.0.0", seed=1).signed.to_bytes()


def test_a_device_offline_through_two_rotations_walks_the_chain_and_learns_the_retirement() -> None:
    k1, k2, k3 = (Ed25519PrivateKey.generate() for _ in range(3))
    chain = _chain(k3, retire(k3, _id(k1)), endorse(k2, k3), endorse(k1, k2))  # any order
    # The wire round trip keeps every signature valid, and the chain fits its published JSON Schema.
    jsonschema.validate(json.loads(chain.model_dump_json()), KeyChain.model_json_schema())
    chain = KeyChain.model_validate_json(chain.model_dump_json())
    trusted, problems = TrustedKeys.enrolled(public_key_b64(k1)).extend(chain)
    assert problems == []
    assert trusted.usable(_id(k3)) and trusted.usable(_id(k2)) and not trusted.usable(_id(k1))
    assert trusted.verify(_signed(k3)).version == "1.0.0"
    with pytest.raises(SignatureError, match="retired"):
        trusted.verify(_signed(k1))


def test_a_device_enrolled_after_a_rotation_trusts_the_older_key_until_it_is_retired() -> None:
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    enrolled = TrustedKeys.enrolled(public_key_b64(k2))
    with pytest.raises(UnknownKeyError) as info:
        enrolled.verify(_signed(k1))
    assert info.value.key_id == _id(k1)
    trusted, _ = enrolled.extend(_chain(k2, endorse(k1, k2)))
    assert trusted.verify(_signed(k1)).version == "1.0.0"  # k2 countersigned its predecessor
    retired, _ = trusted.extend(_chain(k2, endorse(k1, k2), retire(k2, _id(k1))))
    with pytest.raises(SignatureError, match="retired"):
        retired.verify(_signed(k1))
    # Once retired, a chain that leaves the retirement out does not bring the key back.
    again, _ = retired.extend(_chain(k2, endorse(k1, k2)))
    assert not again.usable(_id(k1))


def test_an_unchained_key_is_never_trusted() -> None:
    k1, k2, attacker = (Ed25519PrivateKey.generate() for _ in range(3))
    trusted = TrustedKeys.enrolled(public_key_b64(k1))
    # The attacker endorses its key with itself, and with a key nobody trusts.
    other = Ed25519PrivateKey.generate()
    grown, problems = trusted.extend(_chain(attacker, endorse(k2, attacker), endorse(other, attacker)))
    assert not grown.usable(_id(attacker))
    assert any("no trusted key in its chain" in p for p in problems)
    with pytest.raises(UnknownKeyError, match="no trusted key endorses"):
        grown.verify(_signed(attacker))


def test_forged_statements_are_skipped_with_the_reason() -> None:
    k1, k2, attacker = (Ed25519PrivateKey.generate() for _ in range(3))
    real = endorse(k1, k2)
    # Only a countersignature by the attacker: the old key never signed this one.
    forged = endorse(attacker, attacker).model_copy(
        update={"previous_key_id": _id(k1), "previous_public_key": public_key_b64(k1)}
    )
    # A statement whose signature was made over another payload.
    tampered = real.model_copy(update={"created_at": real.created_at.replace(year=2000)})
    # A retirement of the current key signed by a key the device does not trust.
    unknown_retirement = retire(attacker, _id(k1))
    bad_retirement = retire(k1, _id(k2)).model_copy(update={"signature": real.signature})
    trusted, problems = TrustedKeys.enrolled(public_key_b64(k1)).extend(
        _chain(k2, forged, tampered, unknown_retirement, bad_retirement)
    )
    assert trusted.keys == {_id(k1): public_key_b64(k1)} and trusted.retired == []
    assert sum("bad signature" in p for p in problems) == 3


def test_a_manifest_signature_is_no_statement_and_a_statement_no_manifest_signature() -> None:
    k1, k2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    release = make_release(k1, "clf", "1.0.0", seed=1)
    manifest_signature = sign_manifest(release.manifest, k1).signature
    endorsement = endorse(k1, k2)
    with pytest.raises(SignatureError):
        endorsement.model_copy(update={"signature": manifest_signature}).check()
    endorsement.check()
