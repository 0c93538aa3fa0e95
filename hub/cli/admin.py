"""Local administration commands: ``init``, ``token`` and ``key``.

They open the hub's database directly (the data dir), so they work before the hub
first starts and while it is down, and an admin who lost every key can make a new one.
"""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from sqlmodel import Session, col, select

from hub import security, tls
from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.errors import HubError
from hub.models import ApiKey, EnrollmentToken, Role

__all__ = ["DataDirOpt", "DatabaseUrlOpt", "init", "key_app", "load_settings", "token_app"]

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="the hub's data dir [env AUTODL_HUB_DATA_DIR]", show_default=False)
]
DatabaseUrlOpt = Annotated[
    str | None, typer.Option("--database-url", help="SQLAlchemy URL [env AUTODL_HUB_DATABASE_URL]", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (for scripts)")]

token_app = typer.Typer(help="Enrollment tokens: create, list, revoke.", no_args_is_help=True)
key_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def load_settings(data_dir: Path | None = None, **overrides: Any) -> HubSettings:
    """Return settings from the environment with the options given on the command line."""
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    try:
        return HubSettings(**values)
    except ValueError as exc:
        _fail(f"bad settings: {exc}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _session(settings: HubSettings) -> Session:
    engine = create_engine_for(settings)
    migrate(engine)
    return Session(engine, expire_on_commit=False)


def _duration(text: str) -> timedelta | None:
    if text in ("never", "0"):
        return None
    match = _DURATION.match(text)
    if match is None:
        _fail(f"duration {text!r}: use a number with s, m, h, d or w (such as 24h), or 'never'")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"label {item!r}: use key=value")
        labels[key] = value
    return labels


def init(
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    admin_name: Annotated[str, typer.Option(help="name of the first admin key")] = "admin",
    san: Annotated[
        list[str], typer.Option("--san", help="a name or address agents reach the hub at, for its certificate")
    ] = [],  # noqa: B006
    tls_cert: Annotated[Path | None, typer.Option(help="your server certificate (PEM) instead of the hub's CA")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="the CA that issued it, for agents to pin")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the data dir, the database schema, the signing key, the TLS CA and server
    certificate (or take yours), and a first admin key (printed once)."""
    settings = load_settings(data_dir, database_url=database_url, tls_sans=san or None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    public_key = security.signing_public_key(settings.signing_key)
    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together")
    try:
        if tls_cert is not None and tls_key is not None:
            tls.install_operator_certificate(settings, tls_cert, tls_key, tls_ca)
        tls.ensure_certificates(settings)
        pin = tls.hub_ca_hash(settings)
    except tls.CertificateError as exc:
        _fail(str(exc))
    with _session(settings) as session:
        admins = session.exec(select(ApiKey).where(ApiKey.role == Role.ADMIN.value, col(ApiKey.revoked).is_(False)))
        secret = None
        if admins.first() is None:
            _, secret = security.create_api_key(session, admin_name, Role.ADMIN, actor="cli:init")
    if as_json:
        out = {"data_dir": str(settings.data_dir), "admin_key": secret, "signing_public_key": public_key}
        typer.echo(json.dumps({**out, "ca_hash": pin}))
        return
    typer.echo(f"data dir:        {settings.data_dir}")
    typer.echo(f"database:        {settings.database_url}")
    typer.echo(f"signing key:     {settings.signing_key} (public {public_key})")
    typer.echo(f"TLS certificate: {settings.tls_cert} (CA {settings.tls_ca}, pin {pin or 'none: not the hub CA'})")
    if secret is None:
        typer.echo("an admin key exists already; make another with `autodl-hub key create NAME --role admin`")
    else:
        typer.echo("admin API key (shown once; store it now):")
        typer.echo(f"  {secret}")


@token_app.command("create")
def token_create(
    max_uses: Annotated[int, typer.Option(min=1, help="how many devices may enroll with it")] = 1,
    expires_in: Annotated[str, typer.Option(help="lifetime such as 30m, 24h, 7d, or 'never'")] = "24h",
    label: Annotated[list[str], typer.Option(help="key=value applied to enrolled devices (repeatable)")] = [],  # noqa: B006
    note: Annotated[str, typer.Option(help="what the token is for")] = "",
    device_label_key: Annotated[
        list[str], typer.Option(help="a label key devices may set themselves (repeatable; default: unprotected keys)")
    ] = [],  # noqa: B006
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an enrollment token and print it once."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        row, secret = security.create_enrollment_token(
            session,
            actor="cli",
            max_uses=max_uses,
            expires_in=_duration(expires_in),
            labels=_labels(label),
            note=note,
            device_label_keys=device_label_key or None,
        )
    command = tls.enroll_command(settings, secret)
    if as_json:
        pin = tls.hub_ca_hash(settings) if settings.public_url.startswith("https://") else None
        out = {"id": row.id, "token": secret, "max_uses": row.max_uses, "enroll_command": command, "ca_hash": pin}
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"enrollment token {row.id} (max uses {row.max_uses}; shown once):\n  {secret}")
        typer.echo(f"enroll a device with:\n  {command}")


@token_app.command("list")
def token_list(data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """List enrollment tokens and their uses."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        for row in session.exec(select(EnrollmentToken).order_by(col(EnrollmentToken.id))):
            state = "revoked" if row.revoked else "active"
            expires = row.expires_at.isoformat() if row.expires_at else "never"
            typer.echo(
                f"{row.id}\t{state}\tuses {row.uses}/{row.max_uses}\texpires {expires}\t{row.labels}\t{row.note}"
            )


@token_app.command("revoke")
def token_revoke(token_id: int, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Revoke an enrollment token (devices it enrolled keep working)."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        try:
            security.revoke_enrollment_token(session, token_id, actor="cli")
        except HubError as exc:
            _fail(exc.message)
    typer.echo(f"enrollment token {token_id} revoked")


@key_app.command("create")
def key_create(
    name: str,
    role: Annotated[Role, typer.Option(help="viewer reads, operator deploys, admin manages credentials")] = Role.VIEWER,
    rate_limit: Annotated[str | None, typer.Option(help="such as 100/hour (default: the hub-wide limit)")] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        try:
            row, secret = security.create_api_key(session, name, role, actor="cli", rate_limit=rate_limit)
        except ValueError as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"id": row.id, "key": secret, "role": row.role}))
    else:
        typer.echo(f"API key {row.id} ({row.role}; shown once):\n  {secret}")


@key_app.command("list")
def key_list(data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """List API keys (never their secrets)."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        for row in session.exec(select(ApiKey).order_by(col(ApiKey.id))):
            state = "revoked" if row.revoked else "active"
            typer.echo(f"{row.id}\t{row.name}\t{row.role}\t{state}\t{row.rate_limit or '-'}")


@key_app.command("revoke")
def key_revoke(key_id: int, data_dir: DataDirOpt = None, database_url: DatabaseUrlOpt = None) -> None:
    """Revoke an API key at once."""
    settings = load_settings(data_dir, database_url=database_url)
    with _session(settings) as session:
        try:
            security.revoke_api_key(session, key_id, actor="cli")
        except HubError as exc:
            _fail(exc.message)
    typer.echo(f"API key {key_id} revoked")
