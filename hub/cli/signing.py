"""``autodl-hub signing-key``: rotate, retire and list the manifest-signing key (through the running hub).

Through the API, like the fleet commands: a rotation writes the key file the serving hub
signs with, and a retirement changes desired states that only the running hub publishes.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from hub.cli.fleet import DEFAULT_HUB, HubOpt, KeyOpt, call_hub
from shared import routes

__all__ = ["signing_key_app"]

signing_key_app = typer.Typer(help="The manifest-signing key: list, rotate, retire.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]


@signing_key_app.command("list")
def signing_key_list(key: KeyOpt, hub: HubOpt = DEFAULT_HUB, as_json: JsonOpt = False) -> None:
    """List the signing keys, oldest first: current, valid (still trusted) or retired, and versions signed."""
    keys = call_hub(hub, key, "GET", f"{routes.SIGNING_KEYS}/summary")
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    for k in keys:
        after = f"after {k['previous_key_id']}" if k["previous_key_id"] else "first key"
        typer.echo(f"{k['key_id']}\t{k['state']}\t{k['versions']} versions\t{k['created_at']}\t{after}")


@signing_key_app.command("rotate")
def signing_key_rotate(key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Make a new signing key, endorsed by the current one; devices follow without re-enrolling."""
    row = call_hub(hub, key, "POST", f"{routes.SIGNING_KEYS}/rotate")
    typer.echo(f"signing key {row['key_id']} now signs new manifests (endorsed by {row['previous_key_id']})")
    typer.echo(f"once the fleet has moved on: autodl-hub signing-key retire {row['previous_key_id']}")


@signing_key_app.command("retire")
def signing_key_retire(key_id: str, key: KeyOpt, hub: HubOpt = DEFAULT_HUB) -> None:
    """Retire KEY_ID: re-sign what it signed with the current key; devices refuse it from now on."""
    done = call_hub(hub, key, "POST", f"{routes.SIGNING_KEYS}/{key_id}/retire")
    typer.echo(
        f"signing key {key_id} retired: {len(done['resigned'])} versions re-signed, "
        f"{done['devices']} devices' desired states updated"
    )
