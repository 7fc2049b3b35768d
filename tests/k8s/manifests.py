"""Rendering the k8s/ kustomizations with `kubectl kustomize`, and reading what the tests check in
the objects: pod specs of workloads, containers, env, labels."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
#: The Kubernetes version the manifests are validated for (kubectl 1.32 / kustomize v5.5 here).
KUBERNETES_VERSION = "1.32"
KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]

#: What `kubectl kustomize` builds: each overlay alone, and the cluster overlay with its optional
#: components. Components are added as the README says (in a kustomization that also sets
#: the namespace), here from a temporary one.
BUILDS: dict[str, tuple[str, list[str]]] = {
    "single-gpu": ("overlays/single-gpu", []),
    "cluster": ("overlays/cluster", []),
    "cluster+keda+multi-gpu": ("overlays/cluster",
                               ["components/keda", "components/multi-gpu-refresh"]),
    "cluster+external-postgres": ("overlays/cluster", ["components/external-postgres"]),
}

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def kustomize(overlay: str, components: list[str], workdir: Path) -> list[Obj]:
    """The objects `kubectl kustomize` renders for `overlay` (a path under k8s/) plus
    `components`."""
    assert KUBECTL is not None
    target = K8S / overlay
    if components:
        # kustomize takes only relative paths to other kustomizations.
        rel = [os.path.relpath(K8S / c, workdir) for c in components]
        (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "namespace": "clinicloop", "resources": [os.path.relpath(target, workdir)],
            "components": rel}))
        target = workdir
    out = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} {components}: {out.stderr}"
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def pod_spec(obj: Obj) -> Obj | None:
    """The pod template's spec of a workload; None for anything else."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in WORKLOAD_KINDS:
        return spec["template"]["spec"]
    return None


def pod_labels(obj: Obj) -> dict[str, str]:
    spec = obj["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" \
        else spec["template"]
    return template["metadata"].get("labels", {})


def workloads(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objs:
        if (spec := pod_spec(obj)) is not None:
            yield obj, spec


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def by_prefix(objs: list[Obj], kind: str, prefix: str) -> Obj:
    """A generated object (ConfigMap) whose name kustomize suffixed with a hash."""
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind}/{prefix}*: {len(found)} found"
    return found[0]


def container(spec: Obj, name: str) -> Obj:
    found = [c for c in containers(spec) if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def env_names(c: Obj) -> list[str]:
    return [e["name"] for e in c.get("env", [])]


def env_value(c: Obj, name: str) -> str | None:
    return next((e.get("value") for e in c.get("env", []) if e["name"] == name), None)


def selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In / NotIn / Exists / DoesNotExist) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True
