"""k8s/ renders with `kubectl kustomize` (each overlay, and with the optional components), every
object validates offline against the Kubernetes 1.32 schemas (kubernetes-validate; the two CRDs,
which it has no schema for, against the fields we rely on), and the rendered objects keep the
contracts with the code: the vLLM flags are what `clinicloop quant plan` prints plus what the
gateway needs, every `CLINICLOOP_*` variable is a real setting, every CLI option used exists,
the spool is per pod, and scoring and refresh run as the CLI contract says."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from clinicloop.backends.vllm_args import vllm_serve_command
from clinicloop.cli import app
from clinicloop.config import EngineSettings, Settings
from tests.k8s.manifests import (
    BUILDS,
    KUBERNETES_VERSION,
    Obj,
    by_prefix,
    container,
    containers,
    env_names,
    env_value,
    find,
    pod_spec,
    workloads,
)

# The custom resources' fields these manifests rely on (their CRDs are not in the schemas).
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {"spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "minProperties": 1},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port", "path"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string",
                                                "pattern": r"^\d+(ms|s|m|h)$"}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {"spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"},
                                                  "kind": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "metadata": {
                        "type": "object", "additionalProperties": {"type": "string"}}}}}}}}},
}


def validate(obj: Obj) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[key])
    else:
        # strict: an unknown field (a typo) is an error, as `kubectl apply` would make it.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_validates(builds, build):
    objs = builds[build]
    assert objs
    errors = []
    for obj in objs:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert all(o["metadata"].get("namespace") == "clinicloop" for o in objs
               if o["kind"] != "Namespace"), "every object lands in the clinicloop namespace"


def test_validation_catches_a_typo(builds):
    deployment = json.loads(json.dumps(find(builds["cluster"], "Deployment",
                                            "clinicloop-vllm")))
    pod_spec(deployment)["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = json.loads(json.dumps(find(builds["cluster+keda+multi-gpu"], "ScaledObject",
                                        "clinicloop-vllm")))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_each_build_has_its_parts(builds):
    def kinds(build: str) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in builds[build]}

    common = {("Deployment", "clinicloop-gateway"), ("StatefulSet", "clinicloop-postgres"),
              ("CronJob", "clinicloop-score"), ("NetworkPolicy", "clinicloop-postgres"),
              ("PersistentVolumeClaim", "clinicloop-spool"),
              ("PersistentVolumeClaim", "clinicloop-adapters")}
    assert common <= kinds("single-gpu")
    assert common | {("Deployment", "clinicloop-vllm"), ("Service", "clinicloop-vllm"),
                     ("NetworkPolicy", "clinicloop-vllm"), ("CronJob", "clinicloop-refresh"),
                     ("HorizontalPodAutoscaler", "clinicloop-gateway"),
                     ("PodDisruptionBudget", "clinicloop-gateway"),
                     ("ServiceMonitor", "clinicloop")} <= kinds("cluster")
    assert ("ScaledObject", "clinicloop-vllm") in kinds("cluster+keda+multi-gpu")
    assert not {k for k in kinds("cluster+external-postgres") if "postgres" in k[1]}
    # The HPA (gateway) and KEDA (vLLM) own those replica counts: a re-apply must not reset them.
    assert "replicas" not in find(builds["cluster"], "Deployment", "clinicloop-gateway")["spec"]
    assert "replicas" not in find(builds["cluster+keda+multi-gpu"], "Deployment",
                                  "clinicloop-vllm")["spec"]
    # single-gpu: vLLM is a container of the gateway's pod, on one GPU.
    gateway = pod_spec(find(builds["single-gpu"], "Deployment", "clinicloop-gateway"))
    assert container(gateway, "vllm")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not [k for k in kinds("single-gpu") if k[0] == "HorizontalPodAutoscaler"]


def vllm_containers(objs: list[Obj]) -> list[Obj]:
    return [c for _, spec in workloads(objs) for c in containers(spec)
            if c["image"].startswith("vllm/vllm-openai:")]


def config_flags(config: dict[str, Any]) -> dict[str, str | None]:
    """`vllm serve --config` keys as flags: `--key value`, or `--key` alone for `true`."""
    return {f"--{k}": None if v is True else str(v) for k, v in config.items()}


def command_flags(argv: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            flags[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return flags


@pytest.mark.parametrize("build", ["single-gpu", "cluster"])
def test_vllm_flags_are_the_plans_and_the_gateways(builds, build):
    config_map = by_prefix(builds[build], "ConfigMap", "vllm-config")
    flags = config_flags(yaml.safe_load(config_map["data"]["config.yaml"]))
    plan_command = shlex.split(config_map["metadata"]["annotations"]["clinicloop.io/plan"])
    assert plan_command[:3] == ["clinicloop", "quant", "plan"]
    runner = CliRunner()
    text = runner.invoke(app, plan_command[1:])
    assert text.exit_code == 0, text.output
    vllm_line = next(line for line in text.output.splitlines() if line.startswith("vLLM:"))
    planned = command_flags(vllm_line.removeprefix("vLLM:").split())
    as_json = runner.invoke(app, [*plan_command[1:], "--json"])
    # The prefill chunk the plan's activation estimate assumes (the rtx4090 launch pins it).
    planned["--max-num-batched-tokens"] = str(json.loads(as_json.output)["prefill_tokens"])
    # What the gateway launches vLLM with itself, less what the plan decides and the address.
    own = command_flags(vllm_serve_command(EngineSettings(), "m", enable_lora=False))
    for decided in ("--host", "--port", "--max-model-len", "--max-num-seqs"):
        own.pop(decided)
    assert "--reasoning-parser" in own and "--tool-call-parser" in own
    expected = planned | own
    assert {k: flags.get(k) for k in expected} == expected
    # Anything else is named here on purpose.
    assert set(flags) - set(expected) == {"--served-model-name"}
    gateway = container(pod_spec(find(builds[build], "Deployment", "clinicloop-gateway")),
                        "gateway")
    config = by_prefix(builds[build], "ConfigMap", "clinicloop-config")
    upstream_model = config["data"]["CLINICLOOP_ENGINE__UPSTREAM_MODEL"]
    assert flags["--served-model-name"] == upstream_model
    assert gateway["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    for c in vllm_containers(builds[build]):
        assert "--config" in c["args"] and c["command"] == ["vllm", "serve"]
        # Every replica loads every adapter from the shared volume; runtime updating on.
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts[env["VLLM_LORA_RESOLVER_CACHE_DIR"]] == "adapters"
        assert mounts["/dev/shm"] and mounts["/etc/vllm"]


def setting_exists(name: str) -> bool:
    """Whether `CLINICLOOP_A__B` names a field of `Settings` (nested with `__`)."""
    model: type[BaseModel] = Settings
    parts = name.removeprefix("CLINICLOOP_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


#: Variables the CLI reads itself (typer `envvar`), not settings.
CLI_VARIABLES = {"CLINICLOOP_ADMIN_KEY", "CLINICLOOP_JUDGE_API_KEY"}


@pytest.mark.parametrize("build", BUILDS)
def test_every_clinicloop_variable_is_a_setting(builds, build):
    names = set()
    for obj in builds[build]:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("clinicloop-"):
            names |= set(obj["data"])
        if (spec := pod_spec(obj)) is not None:
            names |= {n for c in containers(spec) for n in env_names(c)}
    used = {n for n in names if n.startswith("CLINICLOOP_")} - CLI_VARIABLES
    assert used and not [n for n in sorted(used) if not setting_exists(n)]


def cli_options(command: list[str]) -> set[str]:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.output))


@pytest.mark.parametrize("build", BUILDS)
def test_every_cli_option_used_exists(builds, build):
    for _, spec in workloads(builds[build]):
        for c in containers(spec):
            if not c["image"].startswith("ghcr.io/clinicloop/clinicloop:"):
                continue
            args = c["args"]
            command = args[:next((i for i, a in enumerate(args) if a.startswith("-")),
                                 len(args))]
            used = {a for a in args if a.startswith("--")}
            missing = used - cli_options(command)
            assert not missing, f"{c['name']}: clinicloop {' '.join(command)} has no {missing}"


@pytest.mark.parametrize("build", ["single-gpu", "cluster"])
def test_gateway_spool_is_per_pod_on_a_shared_volume(builds, build):
    spec = pod_spec(find(builds[build], "Deployment", "clinicloop-gateway"))
    gateway = container(spec, "gateway")
    names = env_names(gateway)
    spool = env_value(gateway, "CLINICLOOP_STORE__SPOOL_PATH")
    assert spool == "/var/lib/clinicloop/spool/$(POD_NAME).jsonl"
    # $(POD_NAME) is expanded only if defined earlier in the list.
    assert names.index("POD_NAME") < names.index("CLINICLOOP_STORE__SPOOL_PATH")
    pod_name = gateway["env"][names.index("POD_NAME")]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts["/var/lib/clinicloop/spool"]]["persistentVolumeClaim"]["claimName"]
    pvc = find(builds[build], "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if build == "single-gpu"
                                          else ["ReadWriteMany"])
    config = by_prefix(builds[build], "ConfigMap", "clinicloop-config")["data"]
    assert config["CLINICLOOP_STORE__ADOPT_SPOOLS"] == "true"
    assert config["CLINICLOOP_REGISTRY__STORAGE"] == "store"
    # The adapters the gateway places are where vLLM's resolver looks, on the same volume.
    adapters = config["CLINICLOOP_ENGINE__LORA_RESOLVER_DIR"]
    assert mounts[adapters] == "adapters"
    for c in vllm_containers(builds[build]):
        assert env_value(c, "VLLM_LORA_RESOLVER_CACHE_DIR") == adapters
    # The schema is migrated before the gateway starts.
    assert container(spec, "migrate")["args"] == ["store", "migrate"]


@pytest.mark.parametrize("build", ["single-gpu", "cluster"])
def test_scoring_is_sharded_without_double_work(builds, build):
    cron = find(builds[build], "CronJob", "clinicloop-score")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    args = container(job["template"]["spec"], "score")["args"]
    assert args[:2] == ["verify", "score"]
    shard = args[args.index("--shard") + 1]
    index, shards = shard.split("/")
    assert index == "$(JOB_COMPLETION_INDEX)" and job["completionMode"] == "Indexed"
    assert int(shards) == job["completions"] == job["parallelism"] > 1
    assert args[args.index("--worker") + 1] == "$(POD_NAME)"


def test_refresh_runs_one_at_a_time_on_a_gpu(builds):
    cron = find(builds["cluster"], "CronJob", "clinicloop-refresh")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    refresh = container(pod_spec(cron), "refresh")
    assert refresh["image"].endswith("-cuda") and refresh["args"][:2] == ["rl", "refresh"]
    assert refresh["resources"]["limits"]["nvidia.com/gpu"] == 1
    multi = container(pod_spec(find(builds["cluster+keda+multi-gpu"], "CronJob",
                                    "clinicloop-refresh")), "refresh")
    gpus = multi["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus > 1 and multi["resources"]["requests"]["nvidia.com/gpu"] == gpus
    # The same command with one training process per GPU: only the training step is launched
    # in several (by `rl refresh` itself), never the whole job.
    assert "command" not in multi
    assert multi["args"] == refresh["args"] + ["--train-processes", str(gpus)]
