"""Worker metrics through OpenTelemetry, served with health probes on one small HTTP endpoint.

``GET /metrics``  Prometheus text format (OpenTelemetry's Prometheus reader)
``GET /healthz``  liveness: the micro-batch loop went round within ``liveness_timeout_s``
``GET /readyz``   readiness: the worker loaded its model and joined its consumer group
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class WorkerMetrics:
    """The instruments of one worker. Without an endpoint they record into a provider nobody reads."""

    def __init__(
        self,
        worker_id: str,
        serving: Callable[[], tuple[str, str]],
        inflight: Callable[[], int],
        readers: Iterable[object] = (),
        desired: Callable[[], str] | None = None,
        lag: Callable[[], Iterable[tuple[str, int, int]]] | None = None,
    ) -> None:
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        self.provider = MeterProvider(
            metric_readers=list(readers),  # type: ignore[arg-type]
            resource=Resource.create({"service.name": "streamserve", "service.instance.id": worker_id}),
            views=[
                View(
                    instrument_name="streamserve.batch.duration",
                    aggregation=ExplicitBucketHistogramAggregation(BATCH_SECONDS_BUCKETS),
                ),
                View(
                    instrument_name="streamserve.redis.duration",
                    aggregation=ExplicitBucketHistogramAggregation(BATCH_SECONDS_BUCKETS),
                ),
                View(
                    instrument_name="streamserve.inference.duration",
                    aggregation=ExplicitBucketHistogramAggregation(BATCH_SECONDS_BUCKETS),
                ),
                View(
                    instrument_name="streamserve.batch.size",
                    aggregation=ExplicitBucketHistogramAggregation(BATCH_SIZE_BUCKETS),
                ),
            ],
        )
        meter: Meter = self.provider.get_meter("streamserve")
        self.psi: dict[tuple[str, str, str], float] = {}
        """The last window's PSI per (model, version, feature), read by the streamserve.drift.psi gauge."""
        self.events = meter.create_counter("streamserve.events", unit="1", description="input records by outcome")
        self.batches = meter.create_counter("streamserve.batches", unit="1", description="micro-batches processed")
        self.batch_duration = meter.create_histogram(
            "streamserve.batch.duration", unit="s", description="decode to produce, per micro-batch"
        )
        self.batch_wait = meter.create_histogram(
            "streamserve.batch.wait",
            unit="s",
            description="how long a batch's first record waited in the worker before the batch was scored",
        )
        self.batch_size = meter.create_histogram("streamserve.batch.size", unit="1", description="records per batch")
        self.feature_defaults = meter.create_counter(
            "streamserve.feature.defaults", unit="1", description="feature values replaced by their default, by reason"
        )
        self.redis_duration = meter.create_histogram(
            "streamserve.redis.duration",
            unit="s",
            description="Redis round trip per batch (one pipelined fetch; for a lookup sent ahead, the wait for it)",
        )
        self.inference_duration = meter.create_histogram(
            "streamserve.inference.duration", unit="s", description="onnxruntime run, per batch and model version"
        )
        self.degraded = meter.create_counter(
            "streamserve.predictions.degraded", unit="1", description="predictions made with default features only"
        )
        self.transactions_aborted = meter.create_counter(
            "streamserve.transactions.aborted", unit="1", description="exactly-once batches aborted and re-read"
        )
        self.pauses = meter.create_counter(
            "streamserve.consumer.pauses", unit="1", description="times intake was paused by a slow sink"
        )
        self.backpressure = meter.create_counter(
            "streamserve.backpressure.wait",
            unit="s",
            description="time the loop waited for acknowledgements with a full in-flight window",
        )
        self.producer_replacements = meter.create_counter(
            "streamserve.producer.replacements",
            unit="1",
            description="transactional producers replaced after a fatal error",
        )
        self.swaps = meter.create_counter(
            "streamserve.model.swaps", unit="1", description="control-topic announcements applied, by result and reason"
        )

        # Counters appear in the scrape from the start (at 0), so dashboards and alerts never see "no data".
        zeroed = (self.degraded, self.transactions_aborted, self.pauses, self.backpressure, self.producer_replacements)
        for counter in zeroed:
            counter.add(0)
        for reason in ("missing", "stale"):
            self.feature_defaults.add(0, {"reason": reason})
        self.swaps.add(0, {"result": "accepted", "reason": "deploy"})
        self.swaps.add(0, {"result": "rejected", "reason": "announcement"})

        def serving_version(options: CallbackOptions) -> Iterable[Observation]:
            model, version = serving()
            yield Observation(1, {"model": model, "version": version})

        def model_info(options: CallbackOptions) -> Iterable[Observation]:
            model, version = serving()
            wanted = desired() if desired is not None else version
            yield Observation(1, {"model": model, "serving_version": version, "desired_version": wanted})

        def consumer_lag(options: CallbackOptions) -> Iterable[Observation]:
            for topic, partition, records in lag() if lag is not None else ():
                yield Observation(records, {"topic": topic, "partition": str(partition)})

        def inflight_batches(options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(inflight())

        def drift_psi(options: CallbackOptions) -> Iterable[Observation]:
            for (model, version, feature), value in list(self.psi.items()):
                yield Observation(value, {"model": model, "version": version, "feature": feature})

        meter.create_observable_gauge("streamserve.model.serving", [serving_version], description="served version")
        meter.create_observable_gauge(
            "streamserve.model.info",
            [model_info],
            description="1, labelled with the version served and the desired one",
        )
        meter.create_observable_gauge(
            "streamserve.consumer.lag", [consumer_lag], unit="1", description="records behind the partition's end"
        )
        meter.create_observable_gauge(
            "streamserve.inflight.batches", [inflight_batches], description="batches awaiting acknowledgement"
        )
        meter.create_observable_gauge(
            "streamserve.drift.psi",
            [drift_psi],
            description="population stability index of a feature (or the score) over the last drift window",
        )

    def shutdown(self) -> None:
        """Flush and stop the provider."""
        self.provider.shutdown()


class HealthState:
    """What the probes look at: the loop's heartbeat, and readiness (model loaded, group joined)."""

    def __init__(self, liveness_timeout_s: float, ready: Callable[[], bool]) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self.last_loop = time.monotonic()
        self._ready = ready

    def beat(self) -> None:
        """The loop went round once."""
        self.last_loop = time.monotonic()

    def live(self) -> bool:
        return time.monotonic() - self.last_loop < self.liveness_timeout_s

    def ready(self) -> bool:
        return self._ready()


class ObserveServer:
    """/metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, host: str, port: int, health: HealthState) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = health.live()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
                elif self.path == "/readyz":
                    ok = health.ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="streamserve-observe", daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self.thread.start()
        log.info("metrics and health on port %d (/metrics /healthz /readyz)", self.port)

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
