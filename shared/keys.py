"""Signing-key rotation: the statements that chain the hub's manifest-signing keys.

The hub signs manifests with one Ed25519 key at a time. Rotating it makes a `KeyEndorsement`,
"key B succeeds key A", signed by A (a device that trusts A may trust B) and countersigned by B
(a device enrolled with B may trust what A signed before it). Retiring a key makes a
`KeyRetirement` signed by the hub's current key; a device that has seen it never trusts that key
again. The hub serves every statement as a `KeyChain`; a device starts from the key it got at
enrollment and grows its `TrustedKeys` only through statements whose signatures check out
(`TrustedKeys.extend`), so a chain from anyone else adds nothing.

Each statement is signed over a domain-separated payload (``autodl-key-...\\0`` + canonical JSON),
so no statement can pass for a manifest signature or for the other kind of statement.

Errors::

    SignatureError (shared.manifest)   a bad statement, or a manifest signed by a retired key
    └── UnknownKeyError                a manifest signed by a key this device does not know (yet)
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from nacl.exceptions import BadSignatureError
from pydantic import BaseModel, ConfigDict, Field

from shared.manifest import Manifest, SignatureError, SignedManifest, key_id, load_public_key, verify_manifest
from shared.messages import utcnow

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "KeyChain",
    "KeyEndorsement",
    "KeyRetirement",
    "TrustedKeys",
    "UnknownKeyError",
    "endorse",
    "public_key_id",
    "retire",
]

KeyId = str
_KEY_ID = r"^[0-9a-f]{16}$"
_B64_KEY = r"^[A-Za-z0-9+/]{43}=$"  # 32 raw bytes
_B64_SIG = r"^[A-Za-z0-9+/]{86}==$"  # 64 raw bytes


class UnknownKeyError(SignatureError):
    """A manifest signed by a key that no trusted key has endorsed (so far)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key_id = key


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def public_key_id(public_key_b64: str) -> str:
    """Return the key id of a base64 raw public key (what a SignedManifest names)."""
    return key_id(bytes(load_public_key(public_key_b64)))


def _payload(domain: bytes, fields: dict[str, object]) -> bytes:
    return domain + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _check(public_key_b64: str, payload: bytes, signature: str, what: str) -> None:
    try:
        load_public_key(public_key_b64).verify(payload, base64.b64decode(signature, validate=True))
    except (BadSignatureError, ValueError) as exc:
        raise SignatureError(f"{what}: bad signature") from exc


class KeyEndorsement(_Frozen):
    """`key_id` succeeds `previous_key_id`: signed by the previous key, countersigned by the new one."""

    kind: Literal["key_endorsement"] = "key_endorsement"
    key_id: KeyId = Field(pattern=_KEY_ID)
    public_key: str = Field(pattern=_B64_KEY, description="base64 raw Ed25519 public key of the new key")
    previous_key_id: KeyId = Field(pattern=_KEY_ID)
    previous_public_key: str = Field(pattern=_B64_KEY)
    created_at: datetime
    signature: str = Field(pattern=_B64_SIG, description="by the previous key, over the payload")
    countersignature: str = Field(pattern=_B64_SIG, description="by the new key, over the payload")

    def payload(self) -> bytes:
        """Return the bytes both keys sign."""
        fields = self.model_dump(mode="json", exclude={"signature", "countersignature"})
        return _payload(b"autodl-key-endorsement\0", fields)

    def check(self) -> None:
        """Raise SignatureError unless the ids match the keys and both signatures verify."""
        what = f"endorsement of key {self.key_id} by {self.previous_key_id}"
        if public_key_id(self.public_key) != self.key_id or public_key_id(self.previous_public_key) != (
            self.previous_key_id
        ):
            raise SignatureError(f"{what}: a key id does not match its public key")
        _check(self.previous_public_key, self.payload(), self.signature, what)
        _check(self.public_key, self.payload(), self.countersignature, what)


class KeyRetirement(_Frozen):
    """`key_id` is no longer trusted, from `retired_at` on; signed by `signer_key_id`."""

    kind: Literal["key_retirement"] = "key_retirement"
    key_id: KeyId = Field(pattern=_KEY_ID)
    retired_at: datetime
    signer_key_id: KeyId = Field(pattern=_KEY_ID)
    signature: str = Field(pattern=_B64_SIG)

    def payload(self) -> bytes:
        """Return the bytes the signer signs."""
        return _payload(b"autodl-key-retirement\0", self.model_dump(mode="json", exclude={"signature"}))


class KeyChain(_Frozen):
    """What ``GET /signing-keys`` answers: the current key and every statement, oldest first."""

    current: KeyId = Field(pattern=_KEY_ID, description="the key that signs new manifests")
    current_public_key: str = Field(pattern=_B64_KEY)
    endorsements: list[KeyEndorsement] = Field(default_factory=list, max_length=1000)
    retirements: list[KeyRetirement] = Field(default_factory=list, max_length=1000)


class TrustedKeys(_Frozen):
    """The keys a device trusts: the one from enrollment and those reached through a chain."""

    keys: dict[KeyId, str] = Field(description="every key reached, by id: base64 public key")
    retired: list[KeyId] = Field(default_factory=list, description="ids never trusted again")

    @classmethod
    def enrolled(cls, public_key_b64: str) -> TrustedKeys:
        """Return the trust of a freshly enrolled device: the key the hub gave it."""
        return cls(keys={public_key_id(public_key_b64): public_key_b64})

    def usable(self, key: KeyId) -> bool:
        """Return True when `key` is trusted and not retired."""
        return key in self.keys and key not in self.retired

    def extend(self, chain: KeyChain) -> tuple[TrustedKeys, list[str]]:
        """Return the trust grown by the statements that check out, and why the others were skipped.

        A key joins when a valid endorsement links it to a usable key (either way); a key is
        retired by a valid statement of a usable key. Repeated until nothing changes, so the
        order of statements does not matter and an agent offline through several rotations
        walks the whole chain.
        """
        keys, retired = dict(self.keys), set(self.retired)
        problems: dict[str, None] = {}  # ordered, each once
        valid: list[KeyEndorsement] = []
        for endorsement in chain.endorsements:
            try:
                endorsement.check()
                valid.append(endorsement)
            except SignatureError as exc:
                problems[str(exc)] = None
        changed = True
        while changed:
            changed = False
            for retirement in chain.retirements:
                signer = keys.get(retirement.signer_key_id)
                if retirement.key_id in retired or signer is None or retirement.signer_key_id in retired:
                    continue
                what = f"retirement of key {retirement.key_id} by {retirement.signer_key_id}"
                try:
                    _check(signer, retirement.payload(), retirement.signature, what)
                except SignatureError as exc:
                    problems[str(exc)] = None
                    continue
                retired.add(retirement.key_id)
                changed = True
            for e in valid:
                for have, have_key, get, get_key in (
                    (e.previous_key_id, e.previous_public_key, e.key_id, e.public_key),
                    (e.key_id, e.public_key, e.previous_key_id, e.previous_public_key),
                ):
                    if have in keys and have not in retired and get not in keys and keys[have] == have_key:
                        keys[get] = get_key
                        changed = True
        for e in valid:
            if e.key_id not in keys:
                problems[f"endorsement of key {e.key_id}: no trusted key in its chain"] = None
        return TrustedKeys(keys=keys, retired=sorted(retired)), list(problems)

    def verify(self, signed: SignedManifest | bytes) -> Manifest:
        """Return the manifest if a usable key signed it; raise UnknownKeyError or SignatureError otherwise."""
        if isinstance(signed, bytes):
            signed = SignedManifest.from_bytes(signed)
        name = f"manifest {signed.manifest.name} {signed.manifest.version}"
        if signed.key_id in self.retired:
            raise SignatureError(f"{name} is signed by key {signed.key_id}, which the hub retired")
        if signed.key_id not in self.keys:
            raise UnknownKeyError(
                f"{name} is signed by key {signed.key_id}, which no trusted key endorses "
                f"(trusted: {', '.join(sorted(self.keys))})",
                signed.key_id,
            )
        return verify_manifest(signed, load_public_key(self.keys[signed.key_id]))


def _sign(private_key: Ed25519PrivateKey, payload: bytes) -> str:
    return base64.b64encode(private_key.sign(payload)).decode()


def _public(private_key: Ed25519PrivateKey) -> str:
    return base64.b64encode(private_key.public_key().public_bytes_raw()).decode()


def endorse(previous: Ed25519PrivateKey, new: Ed25519PrivateKey, created_at: datetime | None = None) -> KeyEndorsement:
    """Return the statement that `new` succeeds `previous`, signed by both (the hub only)."""
    unsigned = {
        "key_id": public_key_id(_public(new)),
        "public_key": _public(new),
        "previous_key_id": public_key_id(_public(previous)),
        "previous_public_key": _public(previous),
        "created_at": created_at or utcnow(),
    }
    blank = "A" * 86 + "=="
    draft = KeyEndorsement.model_validate({**unsigned, "signature": blank, "countersignature": blank})
    payload = draft.payload()
    return draft.model_copy(update={"signature": _sign(previous, payload), "countersignature": _sign(new, payload)})


def retire(signer: Ed25519PrivateKey, key: KeyId, retired_at: datetime | None = None) -> KeyRetirement:
    """Return the statement that `key` is retired, signed by `signer` (the hub's current key)."""
    blank = "A" * 86 + "=="
    draft = KeyRetirement(
        key_id=key, retired_at=retired_at or utcnow(), signer_key_id=public_key_id(_public(signer)), signature=blank
    )
    return draft.model_copy(update={"signature": _sign(signer, draft.payload())})
