"""Artifacts: content-addressed files, streamed, with ETag, Range (206) and If-None-Match (304)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import StreamingResponse
from sqlmodel import select

from hub.api.deps import Caller, SettingsDep
from hub.db import SessionDep
from hub.fleet import devices
from hub.models import Artifact
from hub.registry import UnknownVersionError, artifact_path
from shared import routes

router = APIRouter(tags=["artifacts"])

Sha256Path = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK = 256 * 1024


class UnknownArtifactError(UnknownVersionError):
    """No stored artifact with that sha256."""


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the inclusive (first, last) byte range asked for; None if it cannot be served.

    Raises ValueError for a range that lies outside the file (416).
    """
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: RFC 9110 lets us send the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise ValueError("range outside the file")
    return start, end


def _stream(path: FsPath, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        left = length
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "the requested byte range"},
    304: {"description": "If-None-Match matched"},
    416: {"description": "the range lies outside the file"},
}


@router.head(routes.ARTIFACT_ROUTE, response_class=Response, responses=_RESPONSES, operation_id="head_artifact")
@router.get(routes.ARTIFACT_ROUTE, response_class=Response, responses=_RESPONSES, operation_id="get_artifact")
def get_artifact(
    sha256: Sha256Path,
    session: SessionDep,
    settings: SettingsDep,
    caller: Caller,
    range_header: Annotated[str | None, Header(alias="Range", max_length=256)] = None,
    if_none_match: Annotated[str | None, Header(max_length=4096)] = None,
    if_range: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Stream a stored file by its sha256 (an API key; a device token for its desired versions' files)."""
    path = artifact_path(settings, sha256)
    known = session.exec(select(Artifact.id).where(Artifact.sha256 == sha256)).first() is not None
    if caller.kind == "device" and not devices.device_may_read_artifact(session, caller.id, sha256):
        known = False  # a 404 like any unknown file: a device learns nothing about other models
    if not known or not path.is_file():
        raise UnknownArtifactError(f"no artifact {sha256}")
    size = path.stat().st_size
    etag = f'"{sha256}"'
    # Content-addressed: the bytes behind a hash never change, so caches may keep them forever.
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    span: tuple[int, int] | None = None
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        try:
            span = _byte_range(range_header, size)
        except ValueError:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span if span is not None else (0, size - 1)
    length = end - start + 1 if size else 0
    headers["Content-Length"] = str(length)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(
        _stream(path, start, length), status_code=status, headers=headers, media_type="application/octet-stream"
    )
