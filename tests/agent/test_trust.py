"""The device's trusted signing keys: grown through the hub's chain, kept in the store, refusals counted."""

from __future__ import annotations

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentSettings
from agent.errors import HubUnavailableError, VerificationError
from agent.store import Store
from agent.trust import KeyRing
from shared.keys import KeyChain, endorse, public_key_id, retire
from shared.manifest import public_key_b64
from tests.support.hubstub import HubStub
from tests.support.models import make_release


def _id(key: Ed25519PrivateKey) -> str:
    return public_key_id(public_key_b64(key))


def _ring(key: Ed25519PrivateKey, settings: AgentSettings, hub: HubStub, client: httpx.Client) -> KeyRing:
    return KeyRing(public_key_b64(key), Store(settings.db_path), client, hub.url)


def test_keys_follow_the_chain_persist_and_restart_from_a_new_enrollment(
    settings: AgentSettings, hub_stub: HubStub, client: httpx.Client
) -> None:
    old, new = hub_stub.key, Ed25519PrivateKey.generate()
    ring = _ring(old, settings, hub_stub, client)
    signed = make_release(new, "m", "1.0.0", seed=1).signed.to_bytes()
    with pytest.raises(VerificationError, match="no trusted key endorses"):
        ring.verify(signed)  # the stub serves no chain: nothing to follow
    hub_stub.chain = (
        200,
        KeyChain(
            current=_id(new),
            current_public_key=public_key_b64(new),
            endorsements=[endorse(old, new)],
            retirements=[retire(new, _id(old))],
        ),
    )
    assert ring.verify(signed, source="test").version == "1.0.0"
    with pytest.raises(VerificationError, match="which the hub retired"):
        ring.verify(make_release(old, "m", "0.9.0", seed=1).signed.to_bytes())
    assert ring.status() == {
        "trusted": [_id(new)],
        "retired": [_id(old)],
        "refused": {"unknown_key": 1, "retired_key": 1},
    }
    hub_stub.chain = None
    # The same enrollment after a restart: the keys learned are kept.
    assert _ring(old, settings, hub_stub, client).verify(signed).version == "1.0.0"
    # Enrolled again with another hub's key: what was learned from the first one no longer counts.
    other = Ed25519PrivateKey.generate()
    fresh = _ring(other, settings, hub_stub, client)
    assert fresh.status()["trusted"] == [_id(other)] and fresh.status()["retired"] == []
    with pytest.raises(VerificationError, match="no trusted key endorses"):
        fresh.verify(signed)


def test_a_hub_that_cannot_answer_is_retried_and_a_bad_chain_changes_nothing(
    settings: AgentSettings, hub_stub: HubStub, client: httpx.Client
) -> None:
    ring = _ring(hub_stub.key, settings, hub_stub, client)
    stranger = Ed25519PrivateKey.generate()
    signed = make_release(stranger, "m", "1.0.0", seed=1).signed.to_bytes()
    hub_stub.chain = (503, None)
    with pytest.raises(HubUnavailableError):
        ring.verify(signed)
    # A chain where the stranger endorses itself: skipped, still refused, counted.
    hub_stub.chain = (
        200,
        KeyChain(
            current=_id(stranger),
            current_public_key=public_key_b64(stranger),
            endorsements=[endorse(Ed25519PrivateKey.generate(), stranger)],
        ),
    )
    with pytest.raises(VerificationError, match="no trusted key endorses"):
        ring.verify(signed)
    assert ring.status()["trusted"] == [_id(hub_stub.key)] and ring.refused["unknown_key"] == 1
