"""Fixtures for the manifest tests: every build of k8s/, rendered once per session."""

from __future__ import annotations

import pytest

from tests.k8s.manifests import BUILDS, KUBECTL, Obj, kustomize


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: it renders k8s/ (`kubectl kustomize`); "
                    "install it (Debian/Google Cloud apt package `kubectl`, or PyPI) to run these")
    return {name: kustomize(overlay, components, tmp_path_factory.mktemp(name))
            for name, (overlay, components) in BUILDS.items()}
