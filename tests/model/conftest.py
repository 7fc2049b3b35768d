"""Shared fixtures for the tiny-model tests: a default build made from scratch in the session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clinicloop.model.tiny import TinyModel
from clinicloop.model.tiny_train import build_tiny
from tests.conftest import FRESH_BUILDS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds the bench-size model; needs CLINICLOOP_SLOW=1")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(tiny_model: TinyModel, models_root: Path) -> TinyModel:
    """A default build made from scratch in this session: the suite's own when it was not cached
    (a fresh machine, as in CI: building it twice would cost minutes), else one built here."""
    build_s = FRESH_BUILDS.get(tiny_model.name)
    model = tiny_model
    if build_s is None:
        started = time.perf_counter()
        model = build_tiny(out_root=models_root, progress=False)
        build_s = time.perf_counter() - started
    # The default size must stay cheap enough to build inside the test suite.
    assert build_s < 300
    return model
