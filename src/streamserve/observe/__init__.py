"""Observability: OpenTelemetry metrics exported for Prometheus, and the health endpoints."""
