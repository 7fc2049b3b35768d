"""The Dockerfile, checked statically (no Docker engine here): the targets the manifests name exist
and are non-root, every base image is pinned, nothing is fetched with ADD or baked in as a
secret, llama-cpp-python is built in a builder stage with the Makefile's version and flags, and
the cpu target carries the tiny model so it serves offline."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

import pytest

from tests.conftest import ROOT
from tests.k8s.manifests import BUILDS, containers, workloads

IMAGE = "ghcr.io/clinicloop/clinicloop"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(text: str) -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[Stage] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(),
                             re.IGNORECASE)
            assert m, line
            stages.append(Stage(name=m.group(2) or str(len(stages)), base=m.group(1)))
        else:
            assert stages, f"{line!r} before the first FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse((ROOT / "Dockerfile").read_text())}


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    out = [stages[name]]
    while out[-1].base in stages:
        out.append(stages[out[-1].base])
    return out


def test_base_images_are_pinned(stages):
    external = {s.base for s in stages.values() if s.base not in stages}
    assert external
    for base in external:
        assert re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*(@sha256:[0-9a-f]{64})?", base) \
            and not base.endswith(":latest"), f"{base} is not pinned to a version"


def test_manifests_name_existing_targets_of_this_version(stages, builds):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    named = {c["image"] for build in BUILDS for _, spec in workloads(builds[build])
             for c in containers(spec) if c["image"].startswith(IMAGE + ":")}
    assert {f"{IMAGE}:{version}-cpu", f"{IMAGE}:{version}-cuda"} == named
    for image in named:
        assert image.rsplit("-", 1)[1] in stages


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_targets_run_as_a_non_root_uid(stages, target):
    users = [arg for s in chain(stages, target) for kw, arg in s.instructions if kw == "USER"]
    # The nearest USER wins; numeric, so the kubelet can check runAsNonRoot.
    assert users, f"{target} has no USER"
    uid = users[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_no_remote_add_and_no_baked_secrets(stages):
    for stage in stages.values():
        for keyword, arg in stage.instructions:
            assert not (keyword == "ADD" and re.search(r"https?://|git@", arg)), arg
            if keyword in ("ENV", "ARG"):
                names = re.findall(r"(\w+)=", arg) or [arg.split()[0]]
                assert not [n for n in names
                            if re.search(r"KEY|TOKEN|PASSWORD|SECRET", n, re.IGNORECASE)], arg
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    # Everything is left out but what the images are built from (no .env, var/, .git).
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == {
        "pyproject.toml", "README.md", "clinicloop/"}


def test_llama_cpp_python_is_built_as_the_makefile_builds_it(stages):
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^LLAMA_CPP_PYTHON := (\S+)", makefile, re.MULTILINE).group(1)
    cmake_args = re.search(r'CMAKE_ARGS="([^"]+)"', makefile).group(1)
    builder = [s for s in stages.values()
               if any("pip wheel" in arg and "llama-cpp-python" in arg
                      for kw, arg in s.instructions if kw == "RUN")]
    assert len(builder) == 1
    text = " ".join(arg for _, arg in builder[0].instructions)
    assert f"LLAMA_CPP_PYTHON={version}" in text and f'CMAKE_ARGS="{cmake_args}"' in text
    # Only its wheel reaches the targets, not the compilers.
    for target in ("cpu", "cuda"):
        assert builder[0] not in chain(stages, target)


def test_cpu_target_serves_offline_with_the_tiny_model(stages):
    cpu = chain(stages, "cpu")
    text = " ".join(f"{kw} {arg}" for s in stages.values() for kw, arg in s.instructions)
    build = re.search(r"clinicloop model build-tiny .*?--out (\S+)", text)
    assert build, "the tiny model is not built at image build"
    models_dir = build.group(1)
    env = " ".join(arg for s in cpu for kw, arg in s.instructions if kw == "ENV")
    copies = [arg for s in cpu for kw, arg in s.instructions if kw == "COPY"]
    assert f"CLINICLOOP_MODELS_DIR={models_dir}" in env
    assert any(models_dir in c and c.startswith("--from=") for c in copies)
    assert any(kw == "HEALTHCHECK" and "/health" in arg for s in cpu for kw, arg in s.instructions)
    entry = [arg for s in cpu for kw, arg in s.instructions if kw == "ENTRYPOINT"]
    assert entry and '"clinicloop"' in entry[0]
