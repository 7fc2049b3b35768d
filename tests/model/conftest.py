"""Shared fixtures for the tiny-model tests: one default build per test session."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clinicloop.model.tiny import TinyModel, build_tiny


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: builds the bench-size model; needs CLINICLOOP_SLOW=1")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_root: Path) -> TinyModel:
    started = time.perf_counter()
    model = build_tiny(out_root=models_root, progress=False)
    # The default size must stay cheap enough to build inside the test suite.
    assert time.perf_counter() - started < 300
    return model
