"""The model registry: versions, aliases, lineage, signed manifests, content-addressed files.

`publish_version` is the one way a version enters the hub (HTTP upload, build pipeline,
training): it checks every file against the manifest, stores it under its sha256
(written to a temporary path, then renamed), signs the manifest and registers the rows
in one transaction, so a failure leaves no half-registered version behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from hub.audit import record
from hub.config import HubSettings
from hub.errors import ConflictError, InvalidInputError, NotFoundError
from hub.models import Artifact, Model, ModelAlias, ModelVersion, VersionStatus, utcnow
from hub.security import load_or_create_signing_key
from shared import routes, tracing
from shared.manifest import Manifest, sign_manifest
from shared.messages import DesiredModel, Release

__all__ = [
    "TOKENIZER_FILE",
    "aliases",
    "ArtifactMismatchError",
    "DuplicateVersionError",
    "UnknownModelError",
    "UnknownVersionError",
    "artifact_path",
    "create_model",
    "deprecate_version",
    "desired_model",
    "get_model",
    "latest_version",
    "lineage",
    "list_versions",
    "manifest_url",
    "publish_build",
    "publish_version",
    "release_of",
    "remove_alias",
    "resolve_version",
    "semver_key",
    "set_alias",
]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
LATEST = "latest"
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_CHUNK = 1024 * 1024


class DuplicateVersionError(ConflictError):
    """The model already has this version; versions are immutable."""


class UnknownModelError(NotFoundError):
    """No model of that name."""


class UnknownVersionError(NotFoundError):
    """No version (or alias) of that name."""


class ArtifactMismatchError(InvalidInputError):
    """A file is missing, extra, or differs in size or sha256 from the manifest."""


@dataclass(frozen=True)
class _Expected:
    size: int
    sha256: str
    target: str | None


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Return a sort key that orders versions as semantic versioning does."""
    match = _SEMVER.match(version)
    if match is None:
        return (-1, -1, -1, 0, version)
    major, minor, patch, pre = match.groups()
    # A pre-release sorts before its release.
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


def artifact_path(settings: HubSettings, sha256: str) -> Path:
    """Return where the blob with this sha256 lives."""
    return settings.artifacts / sha256[:2] / sha256


def manifest_url(settings: HubSettings, name: str, version: str) -> str:
    """Return the absolute URL agents fetch a version's signed manifest from."""
    return routes.url(settings.public_url, routes.manifest(name, version))


def desired_model(settings: HubSettings, model: Model, version: ModelVersion) -> DesiredModel:
    """Return the desired-state entry that deploys `version`."""
    return DesiredModel(
        version=version.version,
        manifest_url=manifest_url(settings, model.name, version.version),
        manifest_sha256=version.manifest_sha256,
    )


def release_of(settings: HubSettings, model: Model, version: ModelVersion) -> Release:
    """Return the retained release announcement of `version`."""
    return Release(
        name=model.name,
        version=version.version,
        manifest_url=manifest_url(settings, model.name, version.version),
        manifest_sha256=version.manifest_sha256,
    )


def get_model(session: Session, name: str) -> Model:
    """Return the model called `name`; raise UnknownModelError otherwise."""
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise UnknownModelError(f"no model {name!r}")
    return model


def create_model(session: Session, name: str, *, task: str = "", description: str = "", actor: str) -> Model:
    """Register a model name (versions come later); raise ConflictError if it exists."""
    if session.exec(select(Model).where(Model.name == name)).first() is not None:
        raise ConflictError(f"model {name!r} exists")
    model = Model(name=name, task=task, description=description)
    session.add(model)
    record(session, actor, "model.create", f"model:{name}", task=task)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"model {name!r} exists") from exc
    return model


def list_versions(session: Session, model: Model) -> list[ModelVersion]:
    """Return a model's versions, newest (by semantic version) first."""
    rows = session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id)).all()
    return sorted(rows, key=lambda v: semver_key(v.version), reverse=True)


def latest_version(session: Session, model: Model) -> ModelVersion | None:
    """Return the highest version that is not deprecated."""
    active = [v for v in list_versions(session, model) if v.status == VersionStatus.ACTIVE.value]
    return active[0] if active else None


def aliases(session: Session, model: Model) -> dict[str, str]:
    """Return alias -> version for a model, ``latest`` included."""
    rows = session.exec(
        select(ModelAlias, ModelVersion)
        .join(ModelVersion, col(ModelVersion.id) == col(ModelAlias.version_id))
        .where(ModelAlias.model_id == model.id)
    ).all()
    result = {alias.alias: version.version for alias, version in rows}
    if (latest := latest_version(session, model)) is not None:
        result[LATEST] = latest.version
    return result


def resolve_version(session: Session, name: str, ref: str) -> tuple[Model, ModelVersion]:
    """Return the model and the version `ref` names: a version, ``latest`` or an alias."""
    model = get_model(session, name)
    if ref == LATEST:
        found = latest_version(session, model)
    elif _SEMVER.match(ref):
        found = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == ref)
        ).first()
    else:
        alias = session.exec(select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == ref)).first()
        found = session.get(ModelVersion, alias.version_id) if alias is not None else None
    if found is None:
        raise UnknownVersionError(f"model {name!r} has no version or alias {ref!r}")
    return model, found


def set_alias(session: Session, name: str, alias: str, version: str, *, actor: str) -> ModelAlias:
    """Point `alias` (``stable`` or any custom name) at a version."""
    if alias == LATEST or _SEMVER.match(alias):
        raise InvalidInputError(f"{alias!r} cannot be set: 'latest' follows the newest version, and versions are fixed")
    model, target = resolve_version(session, name, version)
    if target.status == VersionStatus.DEPRECATED.value:
        raise ConflictError(f"{name} {target.version} is deprecated")
    row = session.exec(select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)).first()
    if row is None:
        row = ModelAlias(model_id=model.id or 0, alias=alias, version_id=target.id or 0)
    else:
        row.version_id, row.updated_at = target.id or 0, utcnow()
    session.add(row)
    record(session, actor, "model.alias", f"model:{name}", alias=alias, version=target.version)
    session.commit()
    return row


def remove_alias(session: Session, name: str, alias: str, *, actor: str) -> None:
    """Delete a custom alias."""
    model = get_model(session, name)
    row = session.exec(select(ModelAlias).where(ModelAlias.model_id == model.id, ModelAlias.alias == alias)).first()
    if row is None:
        raise UnknownVersionError(f"model {name!r} has no alias {alias!r}")
    session.delete(row)
    record(session, actor, "model.unalias", f"model:{name}", alias=alias)
    session.commit()


def deprecate_version(session: Session, name: str, version: str, *, actor: str) -> ModelVersion:
    """Mark a version deprecated: it stays downloadable but is no longer ``latest`` or deployable."""
    _, row = resolve_version(session, name, version)
    if row.status != VersionStatus.DEPRECATED.value:
        row.status, row.deprecated_at = VersionStatus.DEPRECATED.value, utcnow()
        session.add(row)
        record(session, actor, "version.deprecate", f"model:{name}@{row.version}")
        session.commit()
    return row


def lineage(session: Session, name: str, version: str) -> list[ModelVersion]:
    """Return the version and its ancestors (by ``parent_version``), nearest first."""
    model, row = resolve_version(session, name, version)
    chain = [row]
    seen = {row.version}
    while (parent := chain[-1].parent_version) is not None and parent not in seen:
        seen.add(parent)
        found = session.exec(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == parent)
        ).first()
        if found is None:
            break
        chain.append(found)
    return chain


def _expected_files(manifest: Manifest) -> dict[str, _Expected]:
    """Return every file the manifest references, by name."""
    expected: dict[str, _Expected] = {}

    def add(name: str, item: _Expected) -> None:
        known = expected.get(name)
        if known is not None and (known.sha256, known.size) != (item.sha256, item.size):
            raise ArtifactMismatchError(f"the manifest names two different files {name!r}")
        expected.setdefault(name, item)

    for variant in manifest.variants:
        # A folder variant (text generation) is every file of its folder, each stored by hash.
        for item in variant.artifact_files():
            add(item.path, _Expected(item.size, item.sha256, variant.target.value))
    text = manifest.preprocessing.text
    if text is not None:
        add(TOKENIZER_FILE, _Expected(text.tokenizer_size, text.tokenizer_sha256, None))
    return expected


def _store_blob(settings: HubSettings, source: Path, expected: _Expected, name: str) -> bool:
    """Copy `source` into the store under its sha256, checking size and hash on the way.

    Returns True when this call created the blob (False when it was there already).
    """
    final = artifact_path(settings, expected.sha256)
    tmp_dir = settings.artifacts / ".tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if size != expected.size or digest.hexdigest() != expected.sha256:
            raise ArtifactMismatchError(
                f"{name}: {size} bytes sha256 {digest.hexdigest()}, the manifest says "
                f"{expected.size} bytes sha256 {expected.sha256}"
            )
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return True
    except OSError as exc:
        raise InvalidInputError(f"{name}: cannot read or store the file: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


@tracing.traced("hub.registry.publish")
def publish_version(
    session: Session,
    settings: HubSettings,
    manifest: Manifest,
    files: Mapping[str, Path],
    *,
    actor: str = "system",
    signing_key: Ed25519PrivateKey | None = None,
) -> ModelVersion:
    """Check, store, sign and register a model version in one transaction.

    `files` maps every file name the manifest references (each variant's ``file``, every
    path of a folder variant's ``files``, and ``tokenizer.json`` for text models) to a local path. Raises DuplicateVersionError
    (409), ArtifactMismatchError (422) when a file is missing, extra or differs.
    """
    if not manifest.variants:
        raise ArtifactMismatchError("the manifest has no variants: there is nothing to deploy")
    expected = _expected_files(manifest)
    missing, extra = sorted(expected.keys() - files.keys()), sorted(files.keys() - expected.keys())
    if missing or extra:
        raise ArtifactMismatchError(f"files missing: {missing or 'none'}; files not in the manifest: {extra or 'none'}")
    model = session.exec(select(Model).where(Model.name == manifest.name)).first()
    if model is not None and _has_version(session, model, manifest.version):
        raise DuplicateVersionError(f"{manifest.name} {manifest.version} exists; versions are immutable")

    key = signing_key or load_or_create_signing_key(settings.signing_key)
    created: list[str] = []
    try:
        for name, item in expected.items():
            if _store_blob(settings, Path(files[name]), item, name):
                created.append(item.sha256)
        signed = sign_manifest(manifest, key).to_bytes()
        if model is None:
            model = Model(name=manifest.name, task=manifest.task)
            session.add(model)
            session.flush()
        lineage_info = manifest.lineage
        parent = lineage_info.get("parent_version", lineage_info.get("parent"))
        dataset = lineage_info.get("dataset_hash", lineage_info.get("data_sha256"))
        config = lineage_info.get("training_config")
        version = ModelVersion(
            model_id=model.id or 0,
            version=manifest.version,
            task=manifest.task,
            manifest=manifest.model_dump(mode="json"),
            signed_manifest=signed.decode(),
            manifest_sha256=hashlib.sha256(signed).hexdigest(),
            metrics=dict(manifest.metrics),
            lineage=dict(lineage_info),
            dataset_hash=str(dataset) if dataset is not None else None,
            training_config=config if isinstance(config, dict) else None,
            parent_version=str(parent) if parent is not None else None,
            published_by=actor,
        )
        session.add(version)
        session.flush()
        for name, item in expected.items():
            session.add(
                Artifact(version_id=version.id or 0, target=item.target, file=name, size=item.size, sha256=item.sha256)
            )
        record(session, actor, "version.publish", f"model:{manifest.name}@{manifest.version}", files=len(expected))
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        _drop_unreferenced(session, settings, created)
        raise DuplicateVersionError(f"{manifest.name} {manifest.version} exists; versions are immutable") from exc
    except BaseException:
        session.rollback()
        _drop_unreferenced(session, settings, created)
        raise
    logger.info("published %s %s (%d files)", manifest.name, manifest.version, len(expected))
    return version


class Build(Protocol):
    """What a build hands over (hub.build.pipeline.BuildResult): a manifest and the files it names."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def files(self) -> Mapping[str, Path]: ...


def publish_build(
    session: Session, settings: HubSettings, result: Build, aliases: Iterable[str] = (), *, actor: str
) -> ModelVersion:
    """Register a build's version (signed) and point `aliases` at it; 'latest' follows by itself."""
    version = publish_version(session, settings, result.manifest, result.files, actor=actor)
    for alias in aliases:
        if alias != LATEST:
            set_alias(session, result.manifest.name, alias, result.manifest.version, actor=actor)
    return version


def _has_version(session: Session, model: Model, version: str) -> bool:
    query = select(ModelVersion.id).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
    return session.exec(query).first() is not None


def _drop_unreferenced(session: Session, settings: HubSettings, shas: list[str]) -> None:
    """Delete blobs this failed publish created, unless a registered artifact uses them."""
    for sha in shas:
        if session.exec(select(Artifact.id).where(Artifact.sha256 == sha)).first() is None:
            artifact_path(settings, sha).unlink(missing_ok=True)
