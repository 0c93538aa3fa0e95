"""Helpers for training tests: example task files shrunk to CI size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import EXAMPLES


def shrink(name: str, tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """Write examples/<name>/task.yaml into tmp_path with sections updated and data paths absolute."""
    task = yaml.safe_load((EXAMPLES / name / "task.yaml").read_text())
    for section, values in sections.items():
        task.setdefault(section, {}).update(values)
    path = task["data"]["path"]
    if not path.startswith("builtin:") and not Path(path).is_absolute():
        task["data"]["path"] = str(EXAMPLES / name / path)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(task))
    return out


@pytest.fixture
def small_task(tmp_path: Path) -> Callable[..., Path]:
    """Return shrink() bound to this test's tmp_path."""

    def make(name: str, **sections: dict[str, Any]) -> Path:
        return shrink(name, tmp_path, **sections)

    return make
