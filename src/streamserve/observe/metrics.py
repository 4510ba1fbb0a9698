"""Worker metrics through OpenTelemetry, served with health probes on one small HTTP endpoint.

``GET /metrics``  Prometheus text format (OpenTelemetry's Prometheus reader and the batch histograms); OpenMetrics,
                  with exemplars (trace ids) on the latency histograms, when the scraper's Accept header asks for
                  ``application/openmetrics-text``
``GET /healthz``  liveness: the micro-batch loop went round within ``liveness_timeout_s``, or it waits by
                  policy on a dependency (a Redis outage under ``redis.on_error: wait``): 503 only when a
                  restart would help
``GET /readyz``   readiness: the worker loaded its model, joined its consumer group, its control plane follows
                  its topic, it is not fenced, and no batch has been stuck for ``stalled_after_s``: 503 (with
                  the reason as body) while the worker cannot make progress
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
        last_batch: Callable[[], float] | None = None,
        group: str = "",
    ) -> None:
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        self.provider = MeterProvider(
            metric_readers=list(readers),  # type: ignore[arg-type]
            resource=Resource.create({"service.name": "streamserve", "service.instance.id": worker_id}),
            views=[
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

        def last_batch_completed(options: CallbackOptions) -> Iterable[Observation]:
            if last_batch is not None:
                yield Observation(last_batch(), {"group": group})

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
        # The heartbeat of the "stuck" alert: with events waiting at the broker, it must keep moving.
        meter.create_observable_gauge(
            "streamserve.last_batch.timestamp",
            [last_batch_completed],
            unit="s",
            description="Unix time the last micro-batch was written to the producer (the worker's start before)",
        )

    def shutdown(self) -> None:
        """Flush and stop the provider."""
        self.provider.shutdown()


Stage = tuple[str, float]
"""The innermost open stage of the batch in progress, and since when (time.monotonic())."""


class HealthState:
    """What the probes look at: the loop's heartbeat, the batch in progress, and readiness.

    Liveness fails only when a restart would help: the loop stopped going round and is not waiting by policy
    (``waits_by_policy``: the stages that may block on a dependency, such as enrich under ``redis.on_error:
    wait``, where a restart would only wait again). Readiness fails while the worker cannot make progress.
    """

    def __init__(
        self,
        liveness_timeout_s: float,
        ready: Callable[[], bool],
        stalled_after_s: float = 30.0,
        current_stage: Callable[[], Stage | None] = lambda: None,
        waits_by_policy: Iterable[str] = (),
    ) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self.stalled_after_s = stalled_after_s
        self.last_loop = time.monotonic()
        self.last_batch = time.time()
        """Unix time the last batch was written (the start until then): the heartbeat metric."""
        self._ready = ready
        self._current_stage = current_stage
        self._waits_by_policy = frozenset(waits_by_policy)
        self._failed: str | None = None

    def beat(self) -> None:
        """The loop went round once."""
        self.last_loop = time.monotonic()

    def batch_written(self) -> None:
        """A batch was written and handed to its delivery: the worker makes progress."""
        self.last_batch = time.time()

    def failed(self, reason: str) -> None:
        """The worker can no longer serve (e.g. fenced): unready from now on."""
        self._failed = reason

    def liveness_problem(self) -> str | None:
        """Why a restart would help, or None."""
        stalled_s = time.monotonic() - self.last_loop
        if stalled_s < self.liveness_timeout_s:
            return None
        stage = self._current_stage()
        if stage is not None and stage[0] in self._waits_by_policy:
            return None  # waiting for a dependency by policy: a new process would wait the same way
        where = f" in stage {stage[0]}" if stage is not None else ""
        return f"loop stalled{where} for {stalled_s:.0f}s"

    def readiness_problem(self) -> str | None:
        """Why the worker cannot make progress now, or None."""
        if self._failed is not None:
            return self._failed
        if not self._ready():
            return "not serving: consumer group not joined yet, or the control-topic follower is down"
        stage = self._current_stage()
        if stage is not None:
            waited_s = time.monotonic() - stage[1]
            if waited_s >= self.stalled_after_s:
                return f"a batch has waited in stage {stage[0]} for {waited_s:.0f}s"
        return None

    def live(self) -> bool:
        """/healthz answers 200."""
        return self.liveness_problem() is None

    def ready(self) -> bool:
        """/readyz answers 200."""
        return self.readiness_problem() is None


class TargetFile:
    """A Prometheus file-based discovery entry naming one scrape target, present while the process serves.

    Written atomically (file discovery must never read half a file); removed on a clean stop. A killed process
    leaves it behind on purpose: Prometheus keeps scraping the dead address, so ``up == 0`` fires.
    """

    def __init__(self, directory: Path, name: str, labels: dict[str, str]) -> None:
        self.path = directory / f"{name}.json"
        self.labels = labels

    def write(self, host: str, port: int) -> None:
        """Name host:port (a wildcard address as 127.0.0.1) as a target with the labels."""
        address = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_suffix(".tmp")
        staged.write_text(json.dumps([{"targets": [f"{address}:{port}"], "labels": self.labels}]))
        os.replace(staged, self.path)

    def remove(self) -> None:
        """No longer a target."""
        self.path.unlink(missing_ok=True)


class _QuietServer(ThreadingHTTPServer):
    """A scraper or probe that hangs up mid-reply (a timeout, a paused process resumed) costs one DEBUG line, not
    socketserver's traceback on stderr; any other handler failure is one WARNING line."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("metrics client %s hung up: %s", client_address, error)
        else:
            log.warning("metrics request from %s failed: %r", client_address, error)


class ObserveServer:
    """/metrics, /healthz and /readyz on one port, in a daemon thread."""

    def __init__(self, host: str, port: int, health: HealthState, target: TargetFile | None = None) -> None:
        from prometheus_client import REGISTRY
        from prometheus_client.exposition import choose_encoder

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    # Prometheus' text format, or OpenMetrics (exemplars included) when the Accept header asks
                    encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, encode(REGISTRY), content_type)
                elif self.path == "/healthz":
                    self._probe(health.liveness_problem(), b"ok\n")
                elif self.path == "/readyz":
                    self._probe(health.readiness_problem(), b"ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _probe(self, problem: str | None, healthy: bytes) -> None:
                if problem is None:
                    self._reply(200, healthy)
                else:
                    self._reply(503, f"{problem}\n".encode())

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _QuietServer((host, port), Handler)
        self.host, self.port, self.target = host, int(self.server.server_address[1]), target
        self.thread = threading.Thread(target=self.server.serve_forever, name="streamserve-observe", daemon=True)

    def start(self) -> None:
        """Serve in the background."""
        self.thread.start()
        log.info("metrics and health on port %d (/metrics /healthz /readyz)", self.port)
        if self.target is not None:
            self.target.write(self.host, self.port)

    def stop(self) -> None:
        """Stop serving."""
        if self.target is not None:
            self.target.remove()
        self.server.shutdown()
        self.server.server_close()
