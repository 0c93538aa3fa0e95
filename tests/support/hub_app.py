"""The real hub app in-process, behind a TestClient: an admin key, API helpers, a built version to upload.

for hub in make_hub(tmp_path, "sqlite:///..."):     # or the `hub` / `sqlite_hub` fixtures
    upload(hub, build_version(tmp_path / "v1"))
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from hub.config import HubSettings
from hub.main import create_app
from hub.models import Role
from hub.security import create_api_key
from shared.manifest import Manifest, Sample, TensorData, TensorSpec, Variant
from shared.targets import TargetId

__all__ = ["Built", "Hub", "build_version", "make_hub", "upload"]


@dataclass
class Hub:
    """The real hub app behind a TestClient, with an admin key."""

    settings: HubSettings
    client: TestClient
    admin_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        """Return the Authorization header for `key` (the admin key by default)."""
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def request(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """Call the API with `key` (the admin key by default)."""
        headers = {**self.headers(key), **kwargs.pop("headers", {})}
        response: httpx.Response = self.client.request(method, path, headers=headers, **kwargs)
        return response

    def new_key(self, role: str, rate_limit: str | None = None) -> str:
        """Create an API key with `role` through the API."""
        body = {"name": f"{role}-{uuid.uuid4().hex[:6]}", "role": role, "rate_limit": rate_limit}
        response = self.request("POST", "/api-keys", json=body)
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key

    def new_token(self, max_uses: int = 1, **body: Any) -> str:
        """Create an enrollment token through the API."""
        response = self.request("POST", "/enrollment-tokens", json={"max_uses": max_uses, **body})
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    def enroll(self, token: str, **body: Any) -> httpx.Response:
        """POST /enroll with `token` and device facts."""
        response: httpx.Response = self.client.post("/enroll", json={"token": token, **body})
        return response

    def enrolled_device(self, **body: Any) -> dict[str, Any]:
        """Enroll one device with a fresh token; return the EnrollResponse JSON."""
        response = self.enroll(self.new_token(), **body)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


def make_hub(tmp_path: Path, database_url: str, **settings: Any) -> Iterator[Hub]:
    """Build the app on `database_url`, make an admin key, yield the Hub."""
    config = HubSettings(
        data_dir=tmp_path / "data", database_url=database_url, public_url="http://hub.test", **settings
    )
    app = create_app(config)
    with app.state.session_factory() as session:
        _, admin = create_api_key(session, "admin", Role.ADMIN, actor="test")
    with TestClient(app) as client:
        yield Hub(config, client, admin)
    app.state.engine.dispose()


@dataclass(frozen=True)
class Built:
    """A manifest and the files it names, as the build pipeline hands them over."""

    manifest: Manifest
    files: dict[str, Path]


def build_version(
    workdir: Path, name: str = "digits", version: str = "1.0.0", *, size: int = 300_000, parent: str | None = None
) -> Built:
    """Make a manifest with two variants (random bytes as model files) and write the files."""
    workdir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    variants = []
    for target, precision in ((TargetId.CPU_FP32, "fp32"), (TargetId.CPU_INT8, "int8")):
        data = os.urandom(size)
        path = workdir / f"{name}-{version}-{target.value}.onnx"
        path.write_bytes(data)
        files[path.name] = path
        variants.append(
            Variant(
                target=target,
                precision=precision,
                providers=["CPUExecutionProvider"],
                file=path.name,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    sample = Sample(
        inputs={"x": TensorData(dtype="float32", shape=[1, 2], data=[0.5, 0.25])},
        outputs={"y": TensorData(dtype="float32", shape=[1, 1], data=[0.75])},
    )
    manifest = Manifest(
        name=name,
        version=version,
        task="classification",
        inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=["batch", 1])],
        sample=sample,
        metrics={"accuracy": 0.97},
        variants=variants,
        lineage={"parent_version": parent, "dataset_hash": "sha256:abc", "training_config": {"lr": 0.01}},
    )
    return Built(manifest, files)


def upload(hub: Hub, built: Built, key: str | None = None) -> httpx.Response:
    """POST a built version to the hub as a multipart upload."""
    handles = [(name, path.open("rb")) for name, path in built.files.items()]
    try:
        parts: list[tuple[str, tuple[str, Any, str]]] = [
            ("manifest", ("manifest.json", built.manifest.model_dump_json().encode(), "application/json"))
        ]
        parts += [("files", (name, handle, "application/octet-stream")) for name, handle in handles]
        return hub.request("POST", f"/models/{built.manifest.name}/versions", key=key, files=parts)
    finally:
        for _, handle in handles:
            handle.close()
