"""Model versions: upload (manifest + files), list, get, signed manifest, lineage, deprecate."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, File, Path, Response, UploadFile, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlmodel import Session, select
from starlette.concurrency import run_in_threadpool

from hub import registry
from hub.api.deps import Caller, MessagingDep, ModelNamePath, Operator, SettingsDep, Viewer
from hub.api.schemas import ArtifactPublic, VersionPublic
from hub.config import HubSettings
from hub.db import SessionDep
from hub.errors import InvalidInputError, PayloadTooLargeError
from hub.fleet import devices
from hub.models import Artifact, Model, ModelVersion
from shared import routes
from shared.manifest import Manifest

router = APIRouter(tags=["versions"])

VersionPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]*$")]
_CHUNK = 1024 * 1024


def version_public(session: Session, settings: HubSettings, model: Model, row: ModelVersion) -> VersionPublic:
    """Return the API form of a version."""
    artifacts = session.exec(select(Artifact).where(Artifact.version_id == row.id)).all()
    return VersionPublic(
        model=model.name,
        version=row.version,
        status=row.status,
        task=row.task,
        metrics=row.metrics,
        lineage=row.lineage,
        dataset_hash=row.dataset_hash,
        parent_version=row.parent_version,
        manifest_url=registry.manifest_url(settings, model.name, row.version),
        manifest_sha256=row.manifest_sha256,
        published_by=row.published_by,
        created_at=row.created_at,
        deprecated_at=row.deprecated_at,
        artifacts=[
            ArtifactPublic(
                target=a.target,
                file=a.file,
                size=a.size,
                sha256=a.sha256,
                url=routes.url(settings.public_url, routes.artifact(a.sha256)),
            )
            for a in artifacts
        ],
    )


@router.post("/models/{name}/versions", status_code=status.HTTP_201_CREATED)
async def upload_version(
    name: ModelNamePath,
    session: SessionDep,
    settings: SettingsDep,
    messaging: MessagingDep,
    caller: Operator,
    manifest: Annotated[UploadFile, File(description="the unsigned manifest JSON")],
    files: Annotated[list[UploadFile], File(description="every file the manifest names, by file name")] = [],  # noqa: B006
) -> VersionPublic:
    """Publish a version: the manifest plus each file it names (the upload's file name)."""
    try:
        parsed = Manifest.model_validate_json(await manifest.read(4 * 1024 * 1024))
    except ValidationError as exc:
        # Only type, place and message: the offending input may not even be JSON (NaN).
        errors = [{"type": e["type"], "loc": ("body", "manifest", *e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise RequestValidationError(errors) from exc
    if parsed.name != name:
        raise InvalidInputError(f"the manifest is for model {parsed.name!r}, the URL names {name!r}")
    workdir = FsPath(tempfile.mkdtemp(prefix="upload-", dir=_tmp_root(settings)))
    try:
        paths: dict[str, FsPath] = {}
        for number, upload in enumerate(files):
            if not upload.filename or upload.filename in paths:
                raise InvalidInputError(f"file #{number}: every file needs a distinct file name")
            target = workdir / f"{number}.bin"
            await _save(upload, target, settings.max_upload_bytes)
            paths[upload.filename] = target
        # Hashing and copying large files must not stall the event loop.
        row = await run_in_threadpool(registry.publish_version, session, settings, parsed, paths, actor=caller.actor)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    model = registry.get_model(session, name)
    if messaging is not None:
        messaging.publish_release(registry.release_of(settings, model, row))
    return version_public(session, settings, model, row)


def _tmp_root(settings: HubSettings) -> FsPath:
    # Uploads land next to the store, so publishing renames within one file system.
    root = settings.artifacts / ".tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


async def _save(upload: UploadFile, target: FsPath, limit: int) -> None:
    size = 0
    with target.open("wb") as out:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"{upload.filename}: larger than the {limit}-byte upload limit")
            out.write(chunk)


@router.get("/models/{name}/versions")
def list_versions(
    name: ModelNamePath, session: SessionDep, settings: SettingsDep, _caller: Viewer
) -> list[VersionPublic]:
    """List a model's versions, newest first."""
    model = registry.get_model(session, name)
    return [version_public(session, settings, model, v) for v in registry.list_versions(session, model)]


@router.get("/models/{name}/versions/{version}")
def get_version(
    name: ModelNamePath, version: VersionPath, session: SessionDep, settings: SettingsDep, _caller: Viewer
) -> VersionPublic:
    """Return a version by number, ``latest`` or alias."""
    model, row = registry.resolve_version(session, name, version)
    return version_public(session, settings, model, row)


@router.get(
    routes.MANIFEST_ROUTE,
    response_class=Response,
    responses={200: {"content": {"application/json": {}}, "description": "the SignedManifest"}},
)
def get_manifest(name: ModelNamePath, version: VersionPath, session: SessionDep, caller: Caller) -> Response:
    """Return the signed manifest bytes (an API key; a device token for versions in its desired state)."""
    _, row = registry.resolve_version(session, name, version)
    if caller.kind == "device" and not devices.device_may_read_version(session, caller.id, name, row.version):
        raise registry.UnknownVersionError(f"model {name!r} has no version or alias {version!r}")
    return Response(
        content=row.signed_manifest.encode(),
        media_type="application/json",
        headers={"ETag": f'"{row.manifest_sha256}"', "X-Manifest-Sha256": row.manifest_sha256},
    )


@router.get("/models/{name}/versions/{version}/lineage")
def get_lineage(
    name: ModelNamePath, version: VersionPath, session: SessionDep, settings: SettingsDep, _caller: Viewer
) -> list[VersionPublic]:
    """Return the version and its ancestors, nearest first."""
    model = registry.get_model(session, name)
    return [version_public(session, settings, model, v) for v in registry.lineage(session, name, version)]


@router.post("/models/{name}/versions/{version}/deprecate")
def deprecate_version(
    name: ModelNamePath, version: VersionPath, session: SessionDep, settings: SettingsDep, caller: Operator
) -> VersionPublic:
    """Deprecate a version: still downloadable, no longer ``latest`` nor deployable."""
    row = registry.deprecate_version(session, name, version, actor=caller.actor)
    return version_public(session, settings, registry.get_model(session, name), row)
