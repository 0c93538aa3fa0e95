"""The ``autodl-hub`` command line."""

from __future__ import annotations

import typer

from hub import __version__

app = typer.Typer(help="autodl hub: train, build, publish and roll out models.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the hub version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
