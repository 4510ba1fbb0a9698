"""docker-compose.yml validated offline (no Docker engine here): structure, references, mounted files, ports."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "topics", "worker", "prometheus", "grafana", "otel-collector"} <= set(services)
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
    assert worker["environment"]["STREAMSERVE_OBSERVE__OTLP_ENDPOINT"].startswith("http://otel-collector:")
