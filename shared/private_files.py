"""Keep a state directory to its owner: the hub's data dir and the agent's state dir alike."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["make_private"]

logger = logging.getLogger(__name__)


def make_private(root: Path) -> None:
    """Keep state to its owner: files made from now on 0600/0700 (umask), existing ones tightened.

    Run at start, so a state dir made by an older version or by hand is fixed too.
    """
    os.umask(0o077)
    if not root.exists():
        return
    for path in [root, *root.rglob("*")]:
        try:
            if path.is_symlink():
                continue
            mode = 0o700 if path.is_dir() else 0o600
            if path.stat().st_mode & 0o777 & ~mode:
                os.chmod(path, path.stat().st_mode & mode)
        except OSError as exc:  # a read-only mount, another owner: say so, keep going
            logger.warning("cannot tighten the mode of %s: %s", path, exc)
