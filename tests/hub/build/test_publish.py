"""Registering a build: the hub signs it, stores its files, and the CLI does it end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

from hub.build.pipeline import BuildResult
from hub.config import HubSettings
from hub.db import create_engine_for, migrate
from hub.models import Model, ModelVersion
from hub.registry import artifact_path, publish_build, resolve_version
from shared.manifest import load_private_key, load_public_key, public_key_b64, verify_manifest
from tests.support.digits import Digits

torch = pytest.importorskip("torch")

CLI = [sys.executable, "-c", "from hub.cli.main import main; main()"]


def _versions(settings: HubSettings) -> list[tuple[str, str]]:
    engine = create_engine_for(settings)
    migrate(engine)
    with Session(engine) as session:
        rows = session.exec(select(Model.name, ModelVersion.version).join(ModelVersion)).all()
    return [(name, version) for name, version in rows]


def test_published_build_is_signed_and_stored_with_its_aliases(cnn: BuildResult, tmp_path: Path) -> None:
    settings = HubSettings(data_dir=tmp_path)
    engine = create_engine_for(settings)
    migrate(engine)
    with Session(engine, expire_on_commit=False) as session:
        version = publish_build(session, settings, cnn, ["stable", "latest"], actor="test")
        # "stable" points at it; "latest" follows the newest version by itself.
        assert resolve_version(session, cnn.manifest.name, "stable")[1].version == cnn.manifest.version
    public = load_public_key(public_key_b64(load_private_key(settings.signing_key.read_bytes())))
    assert verify_manifest(version.signed_manifest.encode(), public) == cnn.manifest
    for variant in cnn.manifest.variants:
        stored = artifact_path(settings, variant.sha256)
        assert stored.read_bytes() == cnn.files[variant.file].read_bytes()


@pytest.mark.slow
def test_cli_builds_and_registers_and_refuses_bad_input(digits: Digits, tmp_path: Path) -> None:
    model = tmp_path / "digits.pt"
    torch.save(digits.model, model)
    good, bad = tmp_path / "val.npz", tmp_path / "bad.npz"
    np.savez(good, input=digits.validation, labels=digits.labels)
    np.savez(bad, input=digits.validation.reshape(-1, 64), labels=digits.labels)
    env = {**os.environ, "AUTODL_HUB_DATA_DIR": str(tmp_path / "hub")}
    base = [*CLI, "build", str(model), "--name", "digits-cli", "--targets", "cpu-fp32,cpu-int8"]

    ok = subprocess.run([*base, "--version", "1.0.0", "--validation", str(good), "--alias", "stable"], env=env,
                        capture_output=True, text=True, timeout=240)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "digits-cli 1.0.0 registered (" in ok.stdout and "stable -> 1.0.0)" in ok.stdout
    assert "cpu-fp32" in ok.stdout and "published" in ok.stdout

    failed = subprocess.run([*base, "--version", "1.0.1", "--validation", str(bad)], env=env,
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: validation:") and "[397, 64]" in last
    # Nothing half-registered: only the good version exists.
    assert _versions(HubSettings(data_dir=tmp_path / "hub")) == [("digits-cli", "1.0.0")]
