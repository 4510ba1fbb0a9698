"""build_worker(): everything a worker needs, built in start order, with the I/O that building takes.

Schemas are read and checked, Redis and Kafka clients opened, record size limits read from the brokers,
the configured model loaded, warmed up and validated. The telemetry is built first and handed to each part
that reports to it (processor, feature builder, delivery, registry) as a constructor argument. The worker
(app.py) receives the parts and only runs them.
"""

from __future__ import annotations

import json
import os
import socket

from streamserve.app import Worker
from streamserve.clients import redis_client
from streamserve.config import PipelineSettings
from streamserve.control.follower import ControlFollower
from streamserve.control.registry import ModelRegistry
from streamserve.observe.context import set_worker
from streamserve.observe.metrics import HealthState, ObserveServer, TargetFile, WorkerMetrics
from streamserve.observe.telemetry import Telemetry, consumer_lag
from streamserve.observe.tracing import BatchTracer
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.decode import make_decoder
from streamserve.pipeline.delivery import delivery_for
from streamserve.pipeline.drift import DriftTap
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.featurelog import FeatureLog
from streamserve.pipeline.features import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.limits import size_limits
from streamserve.pipeline.process import ENRICH_STAGE, BatchProcessor, ScoredTap
from streamserve.pipeline.sink import OutputSink
from streamserve.pipeline.source import KafkaSource
from streamserve.pipeline.subjects import prediction_prefix
from streamserve.records import Source


def build_worker(settings: PipelineSettings) -> Worker:
    """A worker for the pipeline, ready to run(); raises ConfigError (one line) for what cannot be served."""
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    set_worker(worker_id)
    event_schema = json.loads(settings.input.schema_path.read_text())
    check_event_schema(event_schema, settings)
    redis = redis_client(settings.redis)
    observe_server, readers = None, []
    if settings.observe.port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
    metrics = WorkerMetrics(
        worker_id,
        serving=lambda: (settings.model.name, registry.routing.live.version),
        inflight=lambda: delivery.inflight,
        readers=readers,
        desired=lambda: registry.desired_version,
        lag=lambda: telemetry.lag,
        last_batch=lambda: health.last_batch,
        group=settings.kafka.group_id,
    )
    updated_at = {spec.updated_at_field for spec in settings.features if spec.updated_at_field}
    tracer = BatchTracer.from_settings(settings.observe, worker_id, settings.kafka.group_id, settings.output.topic)
    telemetry = Telemetry(metrics, tracer, updated_at, export=settings.observe.port is not None)
    try:  # the telemetry exports from its start: a part that cannot be built must not leave it behind
        control = settings.control
        registry = ModelRegistry(
            settings.model,
            settings.features,
            control.keep_versions,
            control.artifact_cache_dir.expanduser(),
            on_swap=[telemetry.swapped],
        )
        encoder = PredictionEncoder(
            settings.output.schema_path,
            settings.input,
            settings.output.copy_fields,
            value_prefix=prediction_prefix(settings),  # b"" unless output.wire_format
            event_schema=event_schema,  # timestamps decode as epoch ms: rendered as before where text is needed
            headers=settings.output.headers,
        )
        fetcher = redis_fetcher(redis, settings.redis)
        features = FeatureBuilder(
            settings.features, fetcher, event_schema=event_schema, start_fetch=fetcher.start, observer=telemetry
        )
        processor = BatchProcessor(
            make_decoder(settings.input.schema_path, settings.kafka),
            features,
            encoder,
            settings.output.topic,
            settings.shadow_topic,
            settings.redis.on_error,
            observer=telemetry,
            taps=scored_taps(settings, event_schema, telemetry),
        )
        producer_config = settings.kafka.producer_config()
        # Known once at start, so every record's size is checked before it is produced (issue 10).
        out_topics = [settings.output.topic, settings.shadow_topic, settings.output.dead_letter_topic]
        if settings.monitor.feature_log:
            out_topics.append(settings.monitor.feature_log_topic)
        limits = size_limits(producer_config, settings.kafka.common(), out_topics)
        source = KafkaSource(settings.kafka.consumer_config(), settings.input.topic)
        # One batch held ahead: its decoding and Redis round trip start before the open batch is scored.
        batcher: MicroBatcher[Source] = MicroBatcher(settings.batch.max_batch_size, settings.batch.max_wait_ms, ahead=1)
        delivery = delivery_for(
            settings.delivery,
            source,
            batcher,
            lambda options: OutputSink({**producer_config, **options}, limits),
            settings.shutdown_timeout_s,
            transactional_id=f"{settings.kafka.group_id}-{worker_id}",
            transaction_timeout_ms=settings.transaction_timeout_ms,
            observer=telemetry,
        )
        follower = (
            ControlFollower(
                settings.kafka.common(), settings.control, registry, worker_id, on_rejected=telemetry.swap_rejected
            )
            if settings.control.enabled
            else None
        )
        # control plane: not ready while the control-topic follower is down (it stops the worker, see Worker._step)
        health = HealthState(
            settings.observe.liveness_timeout_s,
            ready=lambda: source.joined and (follower is None or follower.healthy()),
            stalled_after_s=settings.observe.stalled_after_s,
            current_stage=telemetry.current_stage,
            # under `wait`, enrich blocks until Redis answers: unready, but a restart would only wait again
            waits_by_policy=[ENRICH_STAGE] if settings.redis.on_error == "wait" else [],
        )
        if settings.observe.port is not None:
            targets_dir, labels = settings.observe.targets_dir, {"job": "streamserve", "group": settings.kafka.group_id}
            target = TargetFile(targets_dir, worker_id, labels) if targets_dir is not None else None
            observe_server = ObserveServer(settings.observe.host, settings.observe.port, health, target)
        return Worker(
            settings=settings,
            worker_id=worker_id,
            source=source,
            batcher=batcher,
            delivery=delivery,
            processor=processor,
            registry=registry,
            follower=follower,
            health=health,
            metrics=metrics,
            telemetry=telemetry,
            observe_server=observe_server,
            read_lag=consumer_lag(source.consumer),
        )
    except BaseException:
        telemetry.close()
        metrics.shutdown()
        raise


def scored_taps(settings: PipelineSettings, event_schema: object, telemetry: Telemetry) -> list[ScoredTap]:
    """What is told of each scored batch: the sampled feature log (monitor.feature_log) and the drift windows."""
    monitor = settings.monitor
    taps: list[ScoredTap] = [DriftTap(monitor.drift_topic, monitor.drift_window, monitor.psi_threshold, telemetry)]
    if monitor.feature_log:
        taps.append(FeatureLog(monitor.feature_log_topic, monitor.feature_log_share, settings.input, event_schema))
    return taps
