"""Give a mosquitto the hub does not run the hub's user, before the broker starts.

``python -m hub.broker.bootstrap DIR`` writes (or updates) ``DIR/dynamic-security.json``
for mosquitto's dynamic-security plugin: the hub's user
(``AUTODL_HUB_MQTT_USERNAME``, password ``AUTODL_HUB_MQTT_PASSWORD``) with the hub role,
deny-by-default for everyone else; device users already in the file are kept. The K3s
mosquitto Deployment runs it as an init container on the broker's volume (see
k3s/base/mosquitto.yaml), so a separate broker gets its auth from the hub's own code and
the hub then adds and removes devices over ``$CONTROL/dynamic-security/v1``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hub.broker.admin import write_hub_dynsec
from hub.config import HubSettings

__all__ = ["BootstrapError", "main", "write_hub_auth"]

logger = logging.getLogger(__name__)


class BootstrapError(Exception):
    """The hub's broker user cannot be written."""


def write_hub_auth(directory: Path, username: str, password: str) -> Path:
    """Create or update ``directory/dynamic-security.json`` with the hub's user; return its path."""
    if not password:
        raise BootstrapError("the hub's MQTT password is empty: set AUTODL_HUB_MQTT_PASSWORD")
    if not directory.is_dir():
        raise BootstrapError(f"{directory} is not a directory")
    path = directory / "dynamic-security.json"
    try:
        write_hub_dynsec(path, username, password)
    except OSError as exc:
        raise BootstrapError(f"cannot write {path}: {exc}") from exc
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write the hub's user into DIR/dynamic-security.json; exit 1 with one line on failure."""
    parser = argparse.ArgumentParser(prog="python -m hub.broker.bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="the broker's data dir (holds dynamic-security.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = HubSettings()
    try:
        path = write_hub_auth(args.directory, settings.mqtt_username, settings.mqtt_password or "")
    except BootstrapError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("broker user %s written to %s", settings.mqtt_username, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
