"""The Helm chart charts/streamserve, checked offline: `helm lint --strict`, `helm template` with the default values
and with every optional part on, every rendered object validated strictly (Kubernetes 1.30 OpenAPI schemas, the
KEDA and prometheus-operator CRD schemas), the ports, names, selectors and topics that must agree cross-checked,
and the values schema shown to refuse a misspelt key. helm comes from scripts/ensure-helm (Go module proxy)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from streamserve.config import load_settings
from tests.deploy.chart import CHART, NAMESPACE, REPO, render, run_helm, validate

pytestmark = pytest.mark.timeout(1800)
"""The first test that needs helm may build it (scripts/ensure-helm): minutes on a new machine."""
ALL_ON = CHART / "ci" / "all-on-values.yaml"
PIPELINE = CHART / "files" / "pipeline.yaml"
RULES = REPO / "monitoring" / "streamserve.rules.yml"
AGGREGATES = [
    {"name": "txn_count_10m", "key": "card_stream:{card_id}", "function": "count", "window_s": 600},
    {"name": "amount_mean_1h", "key": "card_stream:{card_id}", "function": "mean", "field": "amount", "window_s": 3600},
]


@pytest.fixture(scope="module")
def stream_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart's pipeline with streaming features, as a user passes theirs (--set-file pipeline=FILE)."""
    pipeline = yaml.safe_load(PIPELINE.read_text())
    pipeline["stream_features"] = {"app_id": "fraud-features", "aggregates": AGGREGATES, "port": 9467}
    path = tmp_path_factory.mktemp("chart") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def all_on(stream_pipeline: Path) -> list[dict[str, Any]]:
    return render("-f", ALL_ON, "--set-file", f"pipeline={stream_pipeline}")


def _one(resources: list[dict[str, Any]], kind: str, component: str = "worker") -> dict[str, Any]:
    (one,) = [
        r
        for r in resources
        if r["kind"] == kind and r["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    return one


def _kinds(resources: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((r["kind"], r["metadata"]["labels"]["app.kubernetes.io/component"]) for r in resources)


def test_helm_lint_strict_passes_with_default_and_all_on_values(stream_pipeline: Path) -> None:
    for args in ([], ["-f", str(ALL_ON), "--set-file", f"pipeline={stream_pipeline}"]):
        result = run_helm("lint", "--strict", CHART, *args)
        assert result.returncode == 0, f"helm lint --strict {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_default_values_render_the_worker_fleet(default: list[dict[str, Any]]) -> None:
    assert _kinds(default) == [
        ("ConfigMap", "config"),
        ("Deployment", "lag-exporter"),
        ("Deployment", "monitor"),
        ("Deployment", "worker"),
        ("NetworkPolicy", "lag-exporter"),
        ("NetworkPolicy", "monitor"),
        ("NetworkPolicy", "worker"),
        ("PodDisruptionBudget", "worker"),
        ("ScaledObject", "worker"),
        ("Service", "lag-exporter"),
        ("Service", "monitor"),
        ("Service", "worker"),
    ]
    for resource in default:
        validate(resource)


def test_all_on_values_render_every_optional_part(all_on: list[dict[str, Any]]) -> None:
    kinds = _kinds(all_on)
    for extra in (
        ("Deployment", "stream-features"),
        ("NetworkPolicy", "stream-features"),
        ("ServiceMonitor", "metrics"),
        ("PrometheusRule", "alerts"),
    ):
        assert extra in kinds
    for resource in all_on:
        validate(resource)
        assert resource["metadata"].get("namespace", NAMESPACE) == NAMESPACE


def test_the_rendered_pipeline_is_a_valid_streamserve_config(all_on: list[dict[str, Any]], tmp_path: Path) -> None:
    (config,) = [r for r in all_on if r["kind"] == "ConfigMap"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(config["data"]["pipeline.yaml"])
    settings = load_settings(path)
    assert [a.name for a in settings.stream_features.aggregates] == [a["name"] for a in AGGREGATES]
    for kind, component in (("Deployment", c) for c in ("worker", "monitor", "lag-exporter", "stream-features")):
        pod = _one(all_on, kind, component)["spec"]["template"]
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == config["metadata"]["name"], f"{component} mounts another pipeline"
        assert pod["spec"]["containers"][0]["args"][-2:] in (
            ["-c", "/etc/streamserve/pipeline.yaml"],
            ["--port", "9466"],
        )
        assert pod["metadata"]["annotations"]["checksum/pipeline"], "a changed pipeline must roll the pods"


def test_keda_owns_the_replica_count_and_scales_on_the_pipelines_own_group(default: list[dict[str, Any]]) -> None:
    deployment = _one(default, "Deployment")
    scaled = _one(default, "ScaledObject")
    assert "replicas" not in deployment["spec"], "a replicas field resets KEDA's count on every upgrade"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    first_container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert scaled["spec"]["scaleTargetRef"]["envSourceContainerName"] == first_container["name"]
    (trigger,) = scaled["spec"]["triggers"]
    env = {e["name"] for e in first_container["env"]}
    assert trigger["metadata"]["bootstrapServersFromEnv"] in env
    pipeline = yaml.safe_load(PIPELINE.read_text())
    assert trigger["metadata"]["topic"] == pipeline["input"]["topic"]
    assert trigger["metadata"]["consumerGroup"] == pipeline["kafka"]["group_id"]
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"
    fallback = scaled["spec"]["fallback"]  # a scaler that cannot read the lag must not freeze the count
    assert fallback["failureThreshold"] >= 1
    assert scaled["spec"]["minReplicaCount"] <= fallback["replicas"] <= scaled["spec"]["maxReplicaCount"]


def test_without_autoscaling_the_deployment_holds_its_replicas() -> None:
    rendered = render("--set", "autoscaling.enabled=false", "--set", "worker.replicas=3")
    assert not [r for r in rendered if r["kind"] == "ScaledObject"]
    assert _one(rendered, "Deployment")["spec"]["replicas"] == 3


def test_sasl_reaches_the_scaler(all_on: list[dict[str, Any]]) -> None:
    (trigger,) = _one(all_on, "ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": "streamserve-kafka-sasl"}
    assert (trigger["metadata"]["sasl"], trigger["metadata"]["tls"]) == ("scram_sha512", "enable")


def test_metrics_ports_agree_everywhere(all_on: list[dict[str, Any]]) -> None:
    pipeline = yaml.safe_load(PIPELINE.read_text())
    expected = {"worker": pipeline["observe"]["port"], "monitor": pipeline["monitor"]["port"], "lag-exporter": 9466}
    for component, port in expected.items():
        pod = _one(all_on, "Deployment", component)["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        (declared,) = container["ports"]
        assert declared["containerPort"] == port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
        service = _one(all_on, "Service", component)
        (service_port,) = service["spec"]["ports"]
        assert (service_port["name"], service_port["port"], service_port["targetPort"]) == (
            "metrics",
            port,
            declared["name"],
        )
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        policy = _one(all_on, "NetworkPolicy", component)
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {port}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                handler = container[probe].get("httpGet") or container[probe]["tcpSocket"]
                assert handler["port"] == declared["name"]


def test_the_service_monitor_scrapes_every_metrics_service_under_a_job_the_alerts_match(
    all_on: list[dict[str, Any]],
) -> None:
    monitor = _one(all_on, "ServiceMonitor", "metrics")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    selected = [
        s
        for s in all_on
        if s["kind"] == "Service"
        and selector["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["labels"][expression["key"]] in expression["values"]
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected) == [
        "lag-exporter",
        "monitor",
        "stream-features",
        "worker",
    ]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    # The operator names each target's job after its Service: StreamserveTargetDown matches job=~".*streamserve.*".
    assert all("streamserve" in s["metadata"]["name"] for s in selected)


def test_a_fullname_without_streamserve_is_refused() -> None:
    result = run_helm("template", "x", CHART, "--set", "fullnameOverride=fraud")
    assert result.returncode != 0
    assert "fullnameOverride" in result.stderr


def test_the_prometheus_rule_is_the_rules_file(all_on: list[dict[str, Any]]) -> None:
    copy = CHART / "files" / "streamserve.rules.yml"
    assert copy.read_bytes() == RULES.read_bytes(), (
        "charts/streamserve/files/streamserve.rules.yml differs from monitoring/streamserve.rules.yml: "
        "cp monitoring/streamserve.rules.yml charts/streamserve/files/"
    )
    rule = _one(all_on, "PrometheusRule", "alerts")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {"StreamserveTargetDown", "StreamserveNoWorker", "StreamserveStuck", "StreamserveLagNotConsumed"} <= set(
        alerts
    )


def test_network_policies_open_only_what_each_pod_uses(all_on: list[dict[str, Any]]) -> None:
    def egress_ports(component: str) -> set[int]:
        policy = _one(all_on, "NetworkPolicy", component)
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        return {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}

    # DNS, Kafka, Redis, the artifact store (HTTPS + the all-on values' 9000), a Schema Registry, OTLP.
    assert egress_ports("worker") == {53, 9092, 9093, 6379, 443, 9000, 8081, 4317, 4318}
    assert egress_ports("monitor") == {53, 9092, 9093, 8081}
    assert egress_ports("lag-exporter") == {53, 9092, 9093}
    assert egress_ports("stream-features") == {53, 9092, 9093, 6379}
    (scrape,) = _one(all_on, "NetworkPolicy", "stream-features")["spec"]["ingress"]  # the pipeline gives a port
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9467}]
    worker = _one(all_on, "NetworkPolicy")
    artifact = next(rule for rule in worker["spec"]["egress"] if {"port": 9000, "protocol": "TCP"} in rule["ports"])
    assert artifact["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}]
    dns = next(rule for rule in worker["spec"]["egress"] if any(p["port"] == 53 for p in rule["ports"]))
    assert {p["protocol"] for p in dns["ports"]} == {"TCP", "UDP"}


def test_an_egress_turned_off_is_gone() -> None:
    rendered = render("--set", "networkPolicy.egress.schemaRegistry.enabled=false")
    policy = _one(rendered, "NetworkPolicy")
    assert 8081 not in {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}


def test_secrets_and_storage(default: list[dict[str, Any]]) -> None:
    pod = _one(default, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env_names = {e["name"] for e in container["env"]}
    assert "STREAMSERVE_REDIS__URL" not in env_names, "the Redis URL comes from a Secret, not a plain value"
    secret_refs = {e["secretRef"]["name"]: e["secretRef"].get("optional", False) for e in container["envFrom"]}
    assert secret_refs["streamserve-redis"] is False
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "streamserve-tls"
    for bound in ("requests", "limits"):
        assert "ephemeral-storage" in container["resources"][bound]
    for resource in ("cpu", "memory"):  # requests == limits: the Guaranteed QoS class
        assert container["resources"]["requests"][resource] == container["resources"]["limits"][resource]


def test_the_monitor_and_the_lag_exporter_run_once_beside_the_workers(default: list[dict[str, Any]]) -> None:
    worker_image = _one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    monitor = _one(default, "Deployment", "monitor")
    assert (monitor["spec"]["replicas"], monitor["spec"]["strategy"]["type"]) == (1, "Recreate")
    exporter = _one(default, "Deployment", "lag-exporter")
    assert exporter["spec"]["replicas"] == 1
    for deployment, args in ((monitor, ["monitor"]), (exporter, ["lag-exporter"])):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == worker_image
        assert container["args"][: len(args) + 2] == [*args, "-c", "/etc/streamserve/pipeline.yaml"]
    worker_policy = _one(default, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    exporter_labels = exporter["spec"]["template"]["metadata"]["labels"]
    assert not worker_policy.items() <= exporter_labels.items(), "the workers' policy would block the exporter"


def test_stream_features_need_aggregates_in_the_pipeline() -> None:
    result = run_helm("template", "streamserve", CHART, "--set", "streamFeatures.enabled=true")
    assert result.returncode != 0
    assert "streamFeatures.enabled needs stream_features.aggregates" in result.stderr


def test_stream_features_run_the_faust_app(all_on: list[dict[str, Any]]) -> None:
    deployment = _one(all_on, "Deployment", "stream-features")
    assert deployment["spec"]["replicas"] == 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["features", "stream", "-c", "/etc/streamserve/pipeline.yaml"]
    assert {e["secretRef"]["name"] for e in container["envFrom"]} >= {"streamserve-redis"}


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "worker.replicass=3"], "replicass"),
        (["--set", "autoscaling.fallback.replica=3"], "replica"),
        (["--set", "serviceMonitor.enable=true"], "enable"),
        (["--set", "networkPolicy.egress.redis.port[0]=6380"], "port"),
    ],
)
def test_a_misspelt_values_key_fails_template_and_lint(args: list[str], key: str) -> None:
    for command in (["template", "streamserve"], ["lint", "--strict"]):
        result = run_helm(*command, CHART, *args)
        assert result.returncode != 0, f"helm {command[0]} accepted {args}"
        output = result.stdout + result.stderr
        assert "additional properties" in output.lower(), output
        assert f"'{key}'" in output, output


def test_a_misspelt_rendered_field_fails_validation(all_on: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(_one(all_on, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    typos: list[tuple[str, str, Any]] = [
        ("ScaledObject", "worker", lambda r: r["spec"]["fallback"].update(replica=3)),
        ("ScaledObject", "worker", lambda r: r["spec"].update(maxReplicas=3)),
        ("ServiceMonitor", "metrics", lambda r: r["spec"]["endpoints"][0].update(intervall="5s")),
        ("PrometheusRule", "alerts", lambda r: r["spec"]["groups"][0]["rules"][0].update(fore="5m")),
        ("ScaledObject", "worker", lambda r: r["spec"].update(pollingInterval="15")),
    ]
    for kind, component, typo in typos:
        resource = copy.deepcopy(_one(all_on, kind, component))
        validate(resource)
        typo(resource)
        with pytest.raises(jsonschema.ValidationError):
            validate(resource)


def test_stream_features_serve_their_metrics_when_the_pipeline_gives_a_port(all_on: list[dict[str, Any]]) -> None:
    """stream_features.port in the pipeline: the features app's pod exposes it, is probed and scraped on it, and
    its headless Service is one the ServiceMonitor selects; the NetworkPolicy lets the scraper in on that port."""
    pod = _one(all_on, "Deployment", "stream-features")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["ports"] == [{"name": "observe", "containerPort": 9467}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "observe"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9467"
    service = _one(all_on, "Service", "stream-features")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9467, "targetPort": "observe"}]
    monitor = next(o for o in all_on if o["kind"] == "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] in selected
    policy = _one(all_on, "NetworkPolicy", "stream-features")
    assert {"protocol": "TCP", "port": 9467} in policy["spec"]["ingress"][0]["ports"]
