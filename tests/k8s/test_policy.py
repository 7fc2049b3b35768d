"""Policy on every rendered workload (Deployment, StatefulSet, CronJob, Job) of every build:
probes on long-running containers, resources, security context, pinned images, secrets only from
Secrets, and NetworkPolicies that let only the allowed clinicloop pods reach vLLM and the store.
Each rule is also shown to fire on a manifest broken on purpose, so a regression fails here.

readOnlyRootFilesystem holds everywhere, with no exception: every path a container writes (/tmp,
caches, the spool, Postgres' data and socket) is a volume."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest

from tests.k8s.manifests import (
    BUILDS,
    LONG_RUNNING_KINDS,
    Obj,
    container,
    containers,
    find,
    pod_labels,
    pod_spec,
    selector_matches,
    workloads,
)

#: Who may reach what: the component label of the pods allowed in. The refresh job evaluates a
#: candidate adapter on vLLM; the scorers and the refresh job read and write the store; the
#: gateway's migrate init container shares the gateway's labels.
ALLOWED = {"vllm": {"gateway", "refresh"}, "postgres": {"gateway", "score", "refresh"}}
#: Prometheus (namespace `monitoring`) may scrape vLLM's /metrics.
SCRAPER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
           "podSelector": {"matchExpressions": [{"key": "app.kubernetes.io/name",
                                                 "operator": "In", "values": ["prometheus"]}]}}
#: Environment variables that carry a credential or the store URL (which holds its password).
SECRET_ENV = re.compile(r"(KEY|KEYS|PASSWORD|TOKEN|SECRET|STORE__URL)$")
#: A pinned tag: a version (digits), never `latest`; or a digest.
PINNED = re.compile(r"^[^@\s]+:(?!latest$)[\w.-]*\d[\w.-]*$|^[^@\s]+@sha256:[0-9a-f]{64}$")


def workload_violations(obj: Obj, spec: Obj) -> list[str]:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    found = []
    pod_security = spec.get("securityContext", {})
    if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        found.append(f"{where}: seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        found.append(f"{where}: a service account token is mounted")
    main = {c["name"] for c in spec["containers"]}
    for c in containers(spec):
        at = f"{where}/{c['name']}"
        security = c.get("securityContext", {})
        if not (security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
                and security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0):
            found.append(f"{at}: may run as root")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{at}: allowPrivilegeEscalation is not false")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append(f"{at}: capabilities are not dropped (ALL)")
        if security.get("privileged"):
            found.append(f"{at}: privileged")
        if security.get("readOnlyRootFilesystem") is not True:
            found.append(f"{at}: root filesystem is writable")
        if not PINNED.match(c["image"]):
            found.append(f"{at}: image {c['image']} is not pinned")
        resources = c.get("resources", {})
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(part, {})):
                found.append(f"{at}: no cpu and memory {part}")
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if gpus != resources.get("requests", {}).get("nvidia.com/gpu"):
            found.append(f"{at}: GPU requests differ from limits")
        if obj["kind"] in LONG_RUNNING_KINDS and c["name"] in main:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    found.append(f"{at}: no {probe}")
        for env in c.get("env", []):
            if SECRET_ENV.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                found.append(f"{at}: {env['name']} is not from a Secret")
        for source in c.get("envFrom", []):
            if not ({"configMapRef", "secretRef"} & set(source)):
                found.append(f"{at}: envFrom {source}")
    return found


def config_violations(objs: list[Obj]) -> list[str]:
    found = [f"Secret/{o['metadata']['name']} is in the manifests (create it, see README)"
             for o in objs if o["kind"] == "Secret"]
    for obj in objs:
        if obj["kind"] == "ConfigMap":
            found += [f"ConfigMap/{obj['metadata']['name']}: {key} belongs in a Secret"
                      for key in obj.get("data", {}) if SECRET_ENV.search(key)]
    return found


def peer_component(peer: Obj) -> set[str] | None:
    """The components a clinicloop podSelector peer admits; None for any other peer."""
    selector = peer.get("podSelector")
    if set(peer) != {"podSelector"} or not selector \
            or selector.get("matchLabels", {}).get("app.kubernetes.io/part-of") != "clinicloop":
        return None
    exprs = [e for e in selector.get("matchExpressions", [])
             if e["key"] == "app.kubernetes.io/component" and e["operator"] == "In"]
    named = selector.get("matchLabels", {}).get("app.kubernetes.io/component")
    if named is not None:
        return {named}
    return set(exprs[0]["values"]) if len(exprs) == 1 else None


def network_violations(objs: list[Obj]) -> list[str]:
    """Every pod of a guarded component is selected by a NetworkPolicy whose ingress admits only
    the allowed components (and, for vLLM, Prometheus), unless it listens on loopback only; and
    every pod that talks to the store or vLLM is among those admitted."""
    found = []
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    pods = [(o, pod_labels(o), spec) for o, spec in workloads(objs)]
    for guarded, allowed in ALLOWED.items():
        admitted_all: set[str] = set()
        for obj, labels, _ in pods:
            if labels.get("app.kubernetes.io/component") != guarded:
                continue
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            selecting = [p for p in policies
                         if selector_matches(p["spec"]["podSelector"], labels)]
            if not selecting:
                found.append(f"{where}: no NetworkPolicy selects it")
            for policy in selecting:
                if "Ingress" not in policy["spec"].get("policyTypes", []):
                    found.append(f"{where}: {policy['metadata']['name']} does not limit ingress")
                for rule in policy["spec"].get("ingress", []):
                    peers = rule.get("from")
                    if not peers:
                        found.append(f"{where}: an ingress rule admits every source")
                        continue
                    for peer in peers:
                        if guarded == "vllm" and peer == SCRAPER:
                            continue
                        admitted = peer_component(peer)
                        if admitted is None or not admitted <= allowed:
                            found.append(f"{where}: ingress from {peer} is not allowed")
                        admitted_all |= admitted or set()
        # The pods that do talk to it are let in (where a policy guards it).
        for obj, labels, spec in pods:
            talks = any(("clinicloop-vllm" in str(c) if guarded == "vllm"
                         else any(e["name"] == "CLINICLOOP_STORE__URL" for e in c.get("env", [])))
                        for c in containers(spec))
            component = labels.get("app.kubernetes.io/component")
            if talks and admitted_all and component not in admitted_all:
                found.append(f"{obj['kind']}/{obj['metadata']['name']} ({component}) uses "
                             f"{guarded} but is not let in")
    # vLLM inside another pod listens on loopback only: nothing outside the pod reaches it.
    for obj, labels, spec in pods:
        for c in spec["containers"]:
            if (c["image"].startswith("vllm/") and labels.get("app.kubernetes.io/component")
                    != "vllm" and c["args"][c["args"].index("--host") + 1] != "127.0.0.1"):
                found.append(f"{obj['metadata']['name']}/{c['name']}: vLLM listens beyond "
                             "its pod's loopback")
    return found


def violations(objs: list[Obj]) -> list[str]:
    found = config_violations(objs) + network_violations(objs)
    for obj, spec in workloads(objs):
        found += workload_violations(obj, spec)
    return found


@pytest.mark.parametrize("build", BUILDS)
def test_policy_holds(builds, build):
    objs = builds[build]
    assert len(list(workloads(objs))) >= 3
    assert violations(objs) == []


def gateway_container(objs: list[Obj]) -> Obj:
    return container(pod_spec(find(objs, "Deployment", "clinicloop-gateway")), "gateway")


def vllm_policy(objs: list[Obj]) -> Obj:
    return find(objs, "NetworkPolicy", "clinicloop-vllm")["spec"]


BREAKAGES: dict[str, tuple[str, Callable[[list[Obj]], None], str]] = {
    "probe removed": ("cluster", lambda o: gateway_container(o).pop("livenessProbe"),
                      "no livenessProbe"),
    "image unpinned": ("cluster", lambda o: gateway_container(o).update(
        image="ghcr.io/clinicloop/clinicloop:latest"), "is not pinned"),
    "untagged image": ("single-gpu", lambda o: container(pod_spec(find(
        o, "Deployment", "clinicloop-gateway")), "vllm").update(image="vllm/vllm-openai"),
        "is not pinned"),
    "no limits": ("cluster", lambda o: gateway_container(o)["resources"].pop("limits"),
                  "no cpu and memory limits"),
    "privilege escalation": ("cluster", lambda o: gateway_container(o)["securityContext"]
                             .update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    "writable root": ("cluster", lambda o: gateway_container(o)["securityContext"]
                      .pop("readOnlyRootFilesystem"), "root filesystem is writable"),
    "root": ("cluster", lambda o: pod_spec(find(o, "StatefulSet", "clinicloop-postgres"))[
        "securityContext"].update(runAsUser=0), "may run as root"),
    "plain secret": ("cluster", lambda o: gateway_container(o)["env"].append(
        {"name": "CLINICLOOP_SERVER__ADMIN_KEYS", "value": '["x"]'}), "is not from a Secret"),
    "vLLM open to all": ("cluster", lambda o: vllm_policy(o)["ingress"].append({}),
                         "admits every source"),
    "vLLM open to scorers": ("cluster", lambda o: vllm_policy(o)["ingress"][0]["from"][0][
        "podSelector"]["matchExpressions"][0]["values"].append("score"), "is not allowed"),
    "store policy gone": ("cluster", lambda o: o.remove(find(o, "NetworkPolicy",
                                                             "clinicloop-postgres")),
                          "no NetworkPolicy selects it"),
    "scorer not let in": ("cluster", lambda o: find(o, "NetworkPolicy", "clinicloop-postgres")[
        "spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0][
        "values"].remove("score"), "uses postgres but is not let in"),
    "sidecar vLLM exposed": ("single-gpu", lambda o: (lambda a: a.__setitem__(
        a.index("127.0.0.1"), "0.0.0.0"))(container(pod_spec(find(
            o, "Deployment", "clinicloop-gateway")), "vllm")["args"]), "listens beyond"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_policy_catches_a_regression(builds, breakage):
    build, breaks, message = BREAKAGES[breakage]
    objs = copy.deepcopy(builds[build])
    breaks(objs)
    assert any(message in v for v in violations(objs)), violations(objs)
