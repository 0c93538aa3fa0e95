"""The ``autodl-agent`` command line."""

from __future__ import annotations

import typer

from agent import __version__

app = typer.Typer(help="autodl edge agent: enroll with a hub, run models, report back.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the agent version."""
    typer.echo(__version__)


def main() -> None:
    """Console-script entry point."""
    app()
