"""The ``autodl-hub`` command line."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from hub import __version__
from hub.cli.admin import DatabaseUrlOpt, DataDirOpt, init, key_app, load_settings, token_app
from hub.cli.build import build_command
from hub.cli.demo import demo
from hub.cli.fleet import command_app, device_app, model_app
from hub.cli.rollouts import rollout_app
from hub.cli.signing import signing_key_app
from hub.cli.train import train
from shared import tracing

app = typer.Typer(help="autodl hub: train, build, publish and roll out models.", no_args_is_help=True)
app.command()(init)
app.add_typer(token_app, name="token")
app.add_typer(key_app, name="key")
app.add_typer(device_app, name="device")
app.add_typer(model_app, name="model")
app.add_typer(command_app, name="command")
app.add_typer(rollout_app, name="rollout")
app.add_typer(signing_key_app, name="signing-key")
app.command()(train)
app.command("build")(build_command)
app.command()(demo)


@app.command()
def version() -> None:
    """Print the hub version."""
    typer.echo(__version__)


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    host: Annotated[str | None, typer.Option(help="HTTP bind address [default 0.0.0.0]")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port [default 8080]")] = None,
    public_url: Annotated[str | None, typer.Option(help="the URL agents use to reach this hub")] = None,
    mqtt_url: Annotated[
        str | None, typer.Option(help="external broker mqtt://host:port (default: run an embedded mosquitto)")
    ] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="port of the embedded mosquitto [default 1883]")] = None,
    mqtt_public_host: Annotated[str | None, typer.Option(help="the MQTT host agents are told")] = None,
    tls: Annotated[
        bool | None, typer.Option("--tls", help="HTTPS and MQTT over TLS on loopback too (beyond it: the default)")
    ] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="plain HTTP and MQTT on an address beyond loopback")
    ] = None,
    san: Annotated[
        list[str], typer.Option("--san", help="another name or address for the hub's certificate (repeatable)")
    ] = [],  # noqa: B006
    mqtt: Annotated[bool, typer.Option("--mqtt/--no-mqtt", help="--no-mqtt: HTTP API only, no broker")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    workers: Annotated[
        int, typer.Option(min=0, max=64, help="training worker processes to run beside the API; 0: none")
    ] = 1,
) -> None:
    """Serve the hub: embedded (or external) MQTT broker, MQTT ingest, the REST API, a training worker."""
    from hub.serve import serve as run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = load_settings(
        data_dir,
        database_url=database_url,
        host=host,
        port=port,
        public_url=public_url,
        mqtt_url=mqtt_url,
        mqtt_port=mqtt_port,
        mqtt_public_host=mqtt_public_host,
        tls=tls,
        insecure=insecure,
        tls_sans=san or None,
    )
    run(settings, mqtt=mqtt, log_level=log_level.lower(), workers=workers)


@app.command()
def worker(
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    name: Annotated[str | None, typer.Option(help="this worker's name in jobs [default host-pid-random]")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run training jobs from the hub database until SIGTERM (cuda jobs only where torch sees a GPU)."""
    from hub.training.worker import run_worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "hub.build", "hub.registry"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    run_worker(load_settings(data_dir, database_url=database_url), name=name, preload=True)


def main() -> None:
    """Console-script entry point."""
    tracing.configure("autodl-hub")  # free unless OTEL_* names an exporter (docs/observability.md)
    app()
