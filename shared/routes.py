"""Every HTTP path of the hub that agents call, built here and nowhere else (as `topics` does for MQTT).

    GET  /trust/ca.pem                              the CA the hub's certificates chain to (PEM), no auth:
                                                    fetched over unverified TLS, trusted once its hash
                                                    matches ``--ca-hash`` (`shared.tls`)
    POST /enroll                                    EnrollRequest -> EnrollResponse
    GET  /models/{name}/versions/{version}/manifest the signed manifest (bytes as signed)
    GET  /artifacts/{sha256}                        a model file; HEAD and Range supported
    GET  /signing-keys                              shared.keys.KeyChain: how the signing key was rotated

The hub declares its routes with the ``*_ROUTE`` templates; both sides build concrete paths
with the functions, and full URLs with `url`.
"""

from __future__ import annotations

__all__ = ["ARTIFACT_ROUTE", "CA", "ENROLL", "MANIFEST_ROUTE", "SIGNING_KEYS", "artifact", "manifest", "url"]

CA = "/trust/ca.pem"
ENROLL = "/enroll"
SIGNING_KEYS = "/signing-keys"


def manifest(name: str, version: str) -> str:
    """Return the path of a version's signed manifest."""
    return f"/models/{name}/versions/{version}/manifest"


def artifact(sha256: str) -> str:
    """Return the path of a model file, addressed by its sha256."""
    return f"/artifacts/{sha256}"


def url(base: str, path: str) -> str:
    """Join the hub's base URL (with or without a trailing slash) and a path built here."""
    return base.rstrip("/") + path


MANIFEST_ROUTE = manifest("{name}", "{version}")
ARTIFACT_ROUTE = artifact("{sha256}")
