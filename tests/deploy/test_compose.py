"""docker-compose.yml validated offline (no Docker engine here): structure, references, mounted files, ports."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "topics", "worker", "monitor", "prometheus", "grafana", "otel-collector"} <= set(services)
    for name, service in services.items():
        assert "image" in service, f"{name} has no image"
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
    worker = services["worker"]
    port = worker["environment"]["STREAMSERVE_OBSERVE__PORT"]
    assert "healthcheck" in worker
    assert f"{port}/healthz" in " ".join(worker["healthcheck"]["test"])
    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"worker:{port}" in targets
    exporter = services["lag-exporter"]["command"]
    assert exporter[0] == "lag-exporter"
    assert f"lag-exporter:{exporter[exporter.index('--port') + 1]}" in targets
    managers = [t for m in prometheus["alerting"]["alertmanagers"] for c in m["static_configs"] for t in c["targets"]]
    assert managers == ["alertmanager:9093"]
    assert "alertmanager" in services
    assert worker["environment"]["STREAMSERVE_OBSERVE__OTLP_ENDPOINT"].startswith("http://otel-collector:")


def test_compose_starts_the_monitor_beside_the_worker() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    monitor, worker = compose["services"]["monitor"], compose["services"]["worker"]
    assert monitor["image"] == worker["image"]
    assert monitor["command"][:2] == ["monitor", "-c"]
    assert monitor["command"][2] == worker["command"][2], "the monitor reads the worker's pipeline config"
    pipeline = yaml.safe_load((REPO / "examples" / "fraud" / "pipeline.yaml").read_text())
    port = pipeline["monitor"]["port"]
    assert f"{port}/healthz" in " ".join(monitor["healthcheck"]["test"])
    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"monitor:{port}" in targets
    assert "monitor" in compose["services"]["prometheus"]["depends_on"]


def test_compose_starts_the_streaming_features_app_beside_the_worker() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    features, worker = compose["services"]["features"], compose["services"]["worker"]
    assert features["image"] == worker["image"]
    assert features["command"][:3] == ["features", "stream", "-c"]
    assert features["command"][3] == worker["command"][2], "the app reads the worker's pipeline config"
    pipeline = yaml.safe_load((REPO / "examples" / "fraud" / "pipeline.yaml").read_text())
    assert pipeline["stream_features"]["aggregates"], "the pipeline declares what the app computes"
    environment = features["environment"]
    assert (
        environment["STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS"]
        == worker["environment"]["STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS"]
    )
    assert environment["STREAMSERVE_REDIS__URL"] == worker["environment"]["STREAMSERVE_REDIS__URL"]
    port = environment["STREAMSERVE_STREAM_FEATURES__PORT"]
    assert f"{port}/healthz" in " ".join(features["healthcheck"]["test"])
    assert f"127.0.0.1:{port}:{port}" in features["ports"]
    assert {"kafka", "redis", "topics"} <= set(features["depends_on"])
    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"features:{port}" in targets
    assert "features" in compose["services"]["prometheus"]["depends_on"]
