"""Every `autodl-hub` command: one Typer app assembled in `main`, one module per command group.

admin (init, token, key), fleet (device, model, command and the hub API caller), rollouts, train, build, demo.
"""

from __future__ import annotations

from hub.cli.main import app, main

__all__ = ["app", "main"]
