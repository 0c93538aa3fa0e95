"""The wire contract between the autodl hub and its agents.

Everything that crosses the wire is declared here once and imported by both sides:
MQTT topics (`shared.topics`), message payloads (`shared.messages`), the signed
artifact manifest (`shared.manifest`), target ids and their choice per device
(`shared.targets`), and the only place bytes become models (`shared.codec`).
This package depends on pydantic and PyNaCl (verifying signatures; the hub signs with
`cryptography`) and does no I/O.
"""

from __future__ import annotations

__all__ = ["PROTOCOL_VERSION", "__version__"]

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
