"""The keys this device trusts to sign manifests, kept in its store, grown only through the hub's key chain.

The device starts from the key it received at enrollment. When a manifest names a key it does
not know, it fetches the hub's `KeyChain` (``GET /signing-keys``) and accepts the key only if
an endorsement links it to a key it already trusts (``shared.keys``). Before each update it
reads the chain again, so it learns of a retired key before it fetches anything new; a key it
has seen retired is never trusted again, whatever a later chain says.

Every refused manifest is counted by reason (`refused`) for /metrics and the status.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter

import httpx
from pydantic import ValidationError

from agent.errors import HubUnavailableError, VerificationError
from agent.store import Store
from shared import routes
from shared.codec import ProtocolError
from shared.keys import KeyChain, TrustedKeys, UnknownKeyError
from shared.manifest import Manifest, SignatureError, SignedManifest

__all__ = ["KeyRing"]

logger = logging.getLogger(__name__)

_STORE_KEY = "signing_keys"


class KeyRing:
    """Verifies signed manifests with the trusted keys; follows the hub's key chain."""

    def __init__(self, enrolled_key: str, store: Store, client: httpx.Client, hub_url: str) -> None:
        self.store = store
        self.client = client
        self.url = routes.url(hub_url, routes.SIGNING_KEYS)
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        trusted = TrustedKeys.enrolled(enrolled_key)
        raw = store.get(_STORE_KEY)
        if raw is not None:
            try:
                stored = TrustedKeys.model_validate_json(raw)
            except ValidationError as exc:  # a damaged store: start again from enrollment, the chain restores the rest
                logger.warning("stored signing keys unreadable, starting from the enrolled key: %s", exc)
            else:
                # Kept only while they include the enrolled key: enrolling again (with another hub) starts afresh.
                if next(iter(trusted.keys)) in stored.keys:
                    trusted = stored
                else:
                    logger.info("stored signing keys belong to an earlier enrollment; starting from the enrolled key")
        self.trusted = trusted

    def verify(self, data: bytes, expected_sha256: str | None = None, source: str = "journaled") -> Manifest:
        """Verify manifest bytes: the desired state's sha256, then a trusted key's signature.

        A manifest signed by a key not known yet makes the device read the hub's chain once;
        raises VerificationError (fatal) when it is still not trusted, HubUnavailableError
        (retried) when the chain cannot be read.
        """
        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            self.refused["sha256"] += 1
            raise VerificationError(f"manifest {source}: sha256 differs from the desired state's")
        try:
            signed = SignedManifest.from_bytes(data)
        except ProtocolError as exc:
            self.refused["malformed"] += 1
            raise VerificationError(f"manifest rejected: {exc}") from exc
        try:
            try:
                return self.trusted.verify(signed)
            except UnknownKeyError:
                self.refresh(required=True)
                return self.trusted.verify(signed)
        except UnknownKeyError as exc:
            self.refused["unknown_key"] += 1
            raise VerificationError(f"manifest rejected: {exc}") from exc
        except SignatureError as exc:
            self.refused["retired_key" if "retired" in str(exc) else "bad_signature"] += 1
            raise VerificationError(f"manifest rejected: {exc}") from exc

    def refresh(self, *, required: bool = False) -> bool:
        """Read the hub's key chain and grow the trusted keys; return True when they changed.

        Unless `required`, a hub that cannot answer is logged and skipped (the keys known stay).
        """
        try:
            response = self.client.get(self.url)
            if response.status_code >= 500 or response.status_code == 429:
                raise HubUnavailableError(f"the hub answered HTTP {response.status_code} for its key chain")
            if response.status_code != 200:
                # An answer, but no chain (a hub older than rotation, a refused token): nothing to follow.
                logger.warning("no key chain from %s: HTTP %d", self.url, response.status_code)
                return False
            chain = KeyChain.model_validate_json(response.content)
        except httpx.HTTPError as exc:
            if required:
                raise HubUnavailableError(f"key chain {self.url}: {exc}") from exc
            logger.info("key chain not read: %s", exc)
            return False
        except HubUnavailableError:
            if required:
                raise
            return False
        except ValidationError as exc:
            self.refused["bad_chain"] += 1
            logger.warning("the hub's key chain does not validate: %s", exc)
            return False
        with self._lock:
            grown, problems = self.trusted.extend(chain)
            for problem in problems:
                logger.warning("key chain: %s", problem)
            if grown == self.trusted:
                return False
            self.store.put(_STORE_KEY, grown.model_dump_json())
            added = sorted(set(grown.keys) - set(self.trusted.keys))
            retired = sorted(set(grown.retired) - set(self.trusted.retired))
            self.trusted = grown
        logger.info("signing keys: trusted now %s; retired now %s", added or "-", retired or "-")
        return True

    def status(self) -> dict[str, object]:
        """Return the trusted and retired key ids and the refusals by reason."""
        trusted = self.trusted
        return {
            "trusted": sorted(k for k in trusted.keys if k not in trusted.retired),
            "retired": list(trusted.retired),
            "refused": dict(self.refused),
        }
