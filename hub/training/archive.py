"""Data archives for training jobs: a tar.gz uploaded once, stored in the database, unpacked by workers.

The archive lives in the hub database (not on the hub's disk) because workers on other
nodes reach the database but not the hub's volume. Anything that could write outside
the unpack folder (absolute paths, ``..``, links, devices) is refused at upload.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

from sqlmodel import Session

from hub.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from hub.models import TrainingData

__all__ = ["check_archive", "store_archive", "unpack_archive"]

MAX_MEMBERS = 100_000
EXPANSION = 20  # unpacked bytes allowed per archive byte (a zip bomb stops here)


def check_archive(content: bytes, limit: int) -> None:
    """Refuse an archive that is too large, not a tar(.gz), or names a path outside its folder."""
    if len(content) > limit:
        raise PayloadTooLargeError(f"data archive of {len(content)} bytes; the limit is {limit}")
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
            total = 0
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise InvalidInputError(f"data archive: more than {MAX_MEMBERS} entries")
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
                    raise InvalidInputError(f"data archive: unsafe path {member.name!r} (absolute or with '..')")
                if not (member.isfile() or member.isdir()):
                    raise InvalidInputError(f"data archive: {member.name!r} is not a plain file or folder")
                total += member.size
                if total > EXPANSION * max(limit, 1):
                    raise InvalidInputError("data archive: unpacks to more than the upload limit allows")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidInputError(f"data archive: not a readable tar or tar.gz file: {exc}") from exc


def store_archive(session: Session, content: bytes, *, limit: int, actor: str) -> TrainingData:
    """Check and keep an archive; the same bytes uploaded twice are stored once."""
    check_archive(content, limit)
    digest = hashlib.sha256(content).hexdigest()
    existing = session.get(TrainingData, digest)
    if existing is not None:
        return existing
    data = TrainingData(id=digest, size=len(content), content=content, created_by=actor)
    session.add(data)
    session.commit()
    session.refresh(data)
    return data


def unpack_archive(session: Session, data_id: str, dest: Path) -> Path:
    """Unpack an uploaded archive into `dest` (checked again: the row may predate a rule)."""
    data = session.get(TrainingData, data_id)
    if data is None:
        raise NotFoundError(f"no data archive {data_id}")
    content = bytes(data.content)
    check_archive(content, max(len(content), 1))
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
        tar.extractall(dest, filter="data")
    return dest
