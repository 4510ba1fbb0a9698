"""The streamserve command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from streamserve import __version__
from streamserve.errors import StreamServeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from streamserve.config import PipelineSettings
    from streamserve.control.rollout import AcceptancePolicy, ArtifactRef
    from streamserve.pipeline.features.replies import FetchFeatures

log = logging.getLogger("streamserve")

DEFAULT_CONFIG = "pipeline.yaml"


def _setup_logging(level: str, log_format: str = "auto") -> None:
    from streamserve.observe.logs import setup_logging

    setup_logging(level, log_format)  # type: ignore[arg-type]  # argparse restricts it to the choices


def _add_config(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        required=required,
        type=Path,
        help="pipeline YAML file, e.g. examples/fraud/pipeline.yaml (env vars STREAMSERVE_<SECTION>__<KEY> "
        "override its keys; KAFKA_BOOTSTRAP_SERVERS and REDIS_URL, as `scripts/stack env` prints them, set "
        "kafka.bootstrap_servers and redis.url)",
    )


ADMIN_TIMEOUT_S = 5.0
RUN_TIMEOUT_S = 10.0
"""How long a starting worker waits for Redis and Kafka (an orchestrator restarts it after that)."""
"""How long admin commands wait for Kafka or Redis to answer before saying which one does not."""


def _add_timeout(parser: argparse.ArgumentParser, default: float = ADMIN_TIMEOUT_S, servers: str = "Kafka") -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"give up with one line naming the server when {servers} does not answer within this many seconds, "
        f"checked before any work starts ({default:g})",
    )


def cmd_init(args: argparse.Namespace) -> int:
    """Write a first pipeline config from your event schema (.avsc) and model (.onnx), and say how each line was
    chosen: a feature per model input mapped to the event field of its name, the key, event-id and event-time
    fields, the score and label outputs. Inputs it cannot map are TODO comments with an example to fill in."""
    from streamserve.ops.preflight import check_file
    from streamserve.ops.scaffold import propose, write

    check_file(args.schema, "event schema", "give --schema your events' Avro schema (.avsc)")
    check_file(args.model, "model", "give --model your model exported to ONNX (.onnx)")
    scaffold = propose(args.schema, args.model, args.out, args.topic)
    written = write(scaffold, args.out, args.force)
    print(f"wrote {', '.join(str(path) for path in written)}")
    for line in scaffold.summary:
        print(f"  {line}")
    if scaffold.todos:
        print(f"{len(scaffold.todos)} TODO(s) in {args.out}, fill them in: (search for TODO)")
        for todo in scaffold.todos:
            print(f"  {todo}")
    print(f"next: streamserve check -c {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check a pipeline config offline: keys, files, every feature against the event schema and the model's
    inputs, the outputs; then score synthetic events through the worker's own processor (Redis features take
    their defaults unless --redis). Prints one line per problem and exits 1, or a sample prediction and exits 0."""
    from streamserve.ops.check import report_lines, run_check

    ours = logging.getLogger("streamserve")
    level = ours.level
    if args.log_level.upper() == "INFO":  # the loader's "loaded model" lines are the worker's, not the report's
        ours.setLevel(logging.WARNING)
    try:
        fetch = _feature_store(args) if args.redis else None
        report = run_check(args.config, args.events, args.seed, fetch=fetch)
    finally:
        ours.setLevel(level)
    lines, ok = report_lines(report, args.config)
    print("\n".join(lines), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _feature_store(args: argparse.Namespace) -> FetchFeatures:
    """The real Redis fetcher of the config (check --redis), once Redis answers."""
    from streamserve.clients import redis_client
    from streamserve.config import load_settings
    from streamserve.ops.preflight import check_pipeline_servers
    from streamserve.pipeline.features import redis_fetcher

    settings = load_settings(args.config)
    check_pipeline_servers(settings, args.timeout, kafka_needed=False)
    return redis_fetcher(redis_client(settings.redis), settings.redis)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain and leave the group."""
    from streamserve.config import load_settings
    from streamserve.ops.preflight import check_pipeline_offline, check_pipeline_servers
    from streamserve.wiring import build_worker

    settings = load_settings(args.config)
    check_pipeline_offline(settings)  # before the servers: a wrong field is no "Kafka did not answer"
    # Redis down at start is fatal only under the policies that would stop on it later anyway: `wait` waits
    # for it and `defaults` scores without it, at start as in flight.
    check_pipeline_servers(settings, args.timeout, redis_needed=settings.redis.on_error in ("dead_letter", "fail"))
    worker = build_worker(settings)

    def give_up() -> None:
        # Closing a client can block when its coordinator vanished (a broker restart); the orchestrator's
        # grace period is the hard limit, so exit on our own first. Nothing is lost once drained.
        log.error("shutdown did not complete within %.0fs; exiting (drained=%s)", deadline_s, worker.drained)
        logging.shutdown()
        os._exit(0 if worker.drained else 1)

    deadline_s = settings.shutdown_timeout_s + 10

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: finishing the current batch, committing, leaving the group", signal.Signals(signum).name)
        worker.stop()
        watchdog = threading.Timer(deadline_s, give_up)
        watchdog.daemon = True
        watchdog.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create the pipeline's topics."""
    from streamserve.config import load_settings
    from streamserve.ops.admin import ensure_topics, pipeline_topics
    from streamserve.ops.preflight import check_kafka

    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    topics = pipeline_topics(settings, args.partitions)
    ensure_topics(settings.kafka.common(), topics)
    for topic in topics:
        print(f"{topic.name}\t{topic.partitions} partition(s)\t{topic.config or ''}")
    return 0


def cmd_acls_grant(args: argparse.Namespace) -> int:
    """Grant the worker and publisher principals exactly the ACLs the pipeline needs (run as an admin)."""
    from streamserve.config import load_settings
    from streamserve.ops.admin import describe_acl, grant, publisher_acls, worker_acls
    from streamserve.ops.preflight import check_kafka

    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    bindings = worker_acls(settings, args.worker) + publisher_acls(settings, args.publisher)
    grant(settings.kafka.common(), bindings)
    for binding in bindings:
        print(describe_acl(binding))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    """Produce synthetic events to the input topic: the demo's card transactions for its schema, else events made
    from the pipeline's own schema (ops/synthetic.py: id fields from 50 entities, <field>-0 ... <field>-49)."""
    from streamserve.config import load_settings
    from streamserve.observe.progress import Progress
    from streamserve.observe.tracing import ProduceTracer
    from streamserve.ops.preflight import check_file, check_kafka
    from streamserve.ops.tools import produce_avro
    from streamserve.pipeline.decode import load_schema

    settings = load_settings(args.config)
    check_file(settings.input.schema_path, "input schema", "fix input.schema in the pipeline config")
    check_kafka(settings.kafka.common(), args.timeout)
    events = _events_to_produce(settings, args)
    # observe.trace_sample_ratio > 0: every event carries the traceparent of its send span (exported over OTLP)
    tracer = ProduceTracer.from_settings(settings.observe, settings.input.topic)
    progress = Progress(args.count, verb="produced", unit="events")
    try:
        sent = produce_avro(
            settings.kafka.producer_config(),
            settings.input.topic,
            load_schema(settings.input.schema_path),
            events,
            settings.input.key_field,
            rate=args.rate,
            headers=tracer.headers if tracer is not None else None,
            on_produced=progress.advance,
        )
    finally:
        progress.close()
        if tracer is not None:
            tracer.shutdown()
    print(f"produced {sent} events to {settings.input.topic}")
    return 0


def _events_to_produce(settings: PipelineSettings, args: argparse.Namespace) -> Iterable[dict[str, object]]:
    """The demo's card transactions for its schema; events made from any other schema (ops/synthetic.py)."""
    import json

    from streamserve.ops.synthetic import EventMaker

    schema = json.loads(settings.input.schema_path.read_text())
    if schema.get("name") == "CardTransaction":
        from streamserve.demo.data import make_entities, make_events

        entities = make_entities(n_cards=args.cards, seed=args.entity_seed)
        return make_events(entities, args.count, seed=args.seed)
    return EventMaker(schema, seed=args.seed, unique=[settings.input.event_id_field]).events(args.count)


def cmd_features_load(args: argparse.Namespace) -> int:
    """Bulk-load entity features from CSV/Parquet into Redis hashes."""
    import redis

    from streamserve.observe.progress import Progress
    from streamserve.ops.preflight import check_file, check_redis, display_url, quick_redis
    from streamserve.ops.tools import load_features, load_packed_features, read_rows

    check_file(args.file, "feature file", "give --file an existing CSV (header row) or .parquet file")
    probe = quick_redis(args.redis_url, args.timeout)
    try:
        check_redis(probe, args.redis_url, args.timeout)
    finally:
        probe.close()
    client = redis.Redis.from_url(args.redis_url)
    shown_url = display_url(args.redis_url)
    progress = Progress(None, verb="wrote", unit="rows")
    if args.packed:
        fields = args.packed.split(",")
        written = load_packed_features(client, read_rows(args.file), args.key_template, fields, 1000, progress.advance)
        progress.close()
        print(f"wrote {written} packed float32 vectors [{args.packed}] to {shown_url} ({args.key_template})")
        return 0
    written = load_features(client, read_rows(args.file), args.key_template, 1000, progress.advance)
    progress.close()
    print(f"wrote {written} hashes to {shown_url} ({args.key_template})")
    return 0


def cmd_features_stream(args: argparse.Namespace) -> int:
    """Keep windowed aggregates per entity in Redis from the input events (a faust-streaming app).

    Reads the pipeline's input topic and, for every aggregate of ``stream_features.aggregates`` (count, sum,
    mean, min, max or distinct_count of an event field over a tumbling or hopping event-time window), writes
    each entity's value over its current window - "the last window_s up to its latest event" - to the Redis
    key and layout the worker reads, stamped with ``updated_at``. State survives restarts (a faust table with a
    changelog topic); start one app per few input partitions to scale; an older value never replaces a newer
    one. Events the aggregates cannot use are dead-lettered with the reason. Stops on SIGTERM/SIGINT.
    """
    from streamserve.clients import faust_brokers
    from streamserve.config import load_settings
    from streamserve.ops.preflight import check_file, check_pipeline_servers
    from streamserve.streaming.app import run

    settings = load_settings(args.config)
    check_file(settings.input.schema_path, "input schema", "set input.schema to the events' .avsc file")
    faust_brokers(settings.kafka, "streamserve features stream")  # refuses what faust's client cannot do, first
    check_pipeline_servers(settings, args.timeout)
    run(settings, args.log_level.lower())
    return 0


@dataclass(frozen=True)
class _ControlTarget:
    """Where and how the models subcommands talk to the control plane."""

    kafka: dict[str, str | int | float | bool]
    topic: str
    status_topic: str
    settings: PipelineSettings | None


def _control_target(args: argparse.Namespace) -> _ControlTarget:
    if args.config is not None:
        from streamserve.config import load_settings

        settings = load_settings(args.config)
        return _ControlTarget(settings.kafka.common(), settings.control.topic, settings.control.status_topic, settings)
    bootstrap = args.bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        raise StreamServeError("give -c PIPELINE.yaml, --bootstrap-servers, or set KAFKA_BOOTSTRAP_SERVERS")
    from streamserve.config import KafkaSettings

    kafka = KafkaSettings(bootstrap_servers=bootstrap).common()  # librdkafka's log through Python logging
    return _ControlTarget(kafka, args.control_topic, args.status_topic, None)


def _policy_and_key(
    args: argparse.Namespace, target: _ControlTarget
) -> tuple[AcceptancePolicy, Ed25519PrivateKey | None]:
    """The workers' acceptance policy as the config describes it; the signing key's own key is trusted too."""
    from streamserve.config import ControlSettings
    from streamserve.control.reading import acceptance_policy
    from streamserve.control.signing import TrustedKeys, load_private

    key = load_private(args.sign_key) if args.sign_key else None
    own = TrustedKeys({}).with_key(key.public_key()) if key is not None else None
    control = target.settings.control if target.settings is not None else ControlSettings()
    return acceptance_policy(control, args.model, also_trust=own), key


def cmd_monitor_join(args: argparse.Namespace) -> int:
    """Join the feature log with the labels topic by event id into the training-set topic, until SIGTERM/SIGINT."""
    from streamserve.config import load_settings
    from streamserve.monitor.join import run_join
    from streamserve.ops.preflight import check_kafka

    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    counts = run_join(settings, stop)
    print(f"training-set join stopped: {counts}")
    return 0


def cmd_monitor_export(args: argparse.Namespace) -> int:
    """Write the training-set topic (inputs as served, prediction, label; one row per event id) to Parquet."""
    from streamserve.config import load_settings
    from streamserve.monitor.export import export_parquet
    from streamserve.ops.preflight import check_kafka

    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    rows = export_parquet(settings, args.to, args.timeout)
    print(f"wrote {rows} training examples from {settings.monitor.training_set_topic} to {args.to}")
    return 0


def cmd_models_publish(args: argparse.Namespace) -> int:
    """Validate a model version locally, then announce it (signed with --sign-key) on the control topic."""
    from streamserve.control.publish import local_validator, publish
    from streamserve.ops.preflight import check_file, check_kafka, local_model_path

    target = _control_target(args)
    policy, key = _policy_and_key(args, target)
    artifact = local_model_path(args.uri)
    if artifact is not None and args.sha256 is None:
        check_file(artifact, "artifact", "give --uri an existing .onnx file (or an http(s):// URI with --sha256)")
    check_kafka(target.kafka, args.timeout)
    validate = None
    config_model = None
    if target.settings is not None:
        validate = None if args.no_validate else local_validator(target.settings.model, target.settings.features)
        config_model = _config_model(target.settings)
    elif not args.no_validate:
        raise StreamServeError(
            "validation loads the model against the pipeline's feature spec: give -c, or --no-validate"
        )
    profile = None
    if args.reference is not None:
        profile = _reference_profile(args, target.settings)
    announcement = publish(
        target.kafka,
        target.topic,
        policy,
        args.version,
        args.uri,
        args.sha256,
        args.action,
        args.share,
        args.notes,
        sign_key=key,
        validate=validate,
        config_model=config_model,
        profile=profile,
    )
    print(
        f"announced {announcement.action} {announcement.model} {announcement.version} generation "
        f"{announcement.generation} (sha256 {announcement.sha256[:12]}..., "
        f"{'signed by ' + announcement.key_id if announcement.key_id else 'unsigned'}, "
        f"previous {announcement.baseline_version}) on {target.topic}"
    )
    return 0


def _reference_profile(args: argparse.Namespace, settings: PipelineSettings | None) -> tuple[str, str]:
    """Profile --reference for the version, write it beside the artifact: (its URI, its sha256)."""
    from streamserve.control.reference import write_profile
    from streamserve.ops.preflight import check_file

    if settings is None:
        raise StreamServeError("--reference scores the sample with the model's feature spec: give -c")
    check_file(args.reference, "reference sample", "give --reference a Parquet or CSV file of model inputs")
    uri, digest, profile = write_profile(args.reference, settings.model, settings.features, args.version, args.uri)
    print(
        f"reference profile of {len(profile.all())} quantities over {profile.rows} rows: {uri} "
        f"(sha256 {digest[:12]}...)"
    )
    return uri, digest


def _config_model(settings: PipelineSettings) -> ArtifactRef | None:
    """The version of the workers' config, with its digest (when readable here): the first rollback target."""
    from streamserve.control.fetch import fetch, sha256_hex
    from streamserve.control.rollout import ArtifactRef
    from streamserve.errors import ModelError

    try:
        digest = settings.model.sha256 or sha256_hex(fetch(settings.model.uri))
    except ModelError:
        return None
    return ArtifactRef(settings.model.version, settings.model.uri, digest.lower())


def cmd_models_rollback(args: argparse.Namespace) -> int:
    """Announce a rollback to the previous (or a named) version."""
    from streamserve.control.publish import rollback
    from streamserve.ops.preflight import check_kafka

    target = _control_target(args)
    policy, key = _policy_and_key(args, target)
    check_kafka(target.kafka, args.timeout)
    announcement = rollback(target.kafka, target.topic, policy, args.to, args.notes, sign_key=key)
    print(
        f"announced rollback of {announcement.model} {announcement.baseline_version} -> {announcement.version} "
        f"(generation {announcement.generation})"
    )
    return 0


def cmd_models_status(args: argparse.Namespace) -> int:
    """Print, per worker: the version served, the version the control topic asks for, the last rejection."""
    from datetime import UTC, datetime

    from streamserve.control.publish import fleet_status
    from streamserve.ops.preflight import check_kafka

    target = _control_target(args)
    check_kafka(target.kafka, args.timeout)
    rows = fleet_status(target.kafka, target.status_topic)
    if not rows:
        print(f"no worker has reported on {target.status_topic} yet")
        return 0
    print(
        f"{'WORKER':<24} {'MODEL':<10} {'SERVING':<16} {'MODE':<7} {'CANDIDATE':<10} {'DESIRED':<16} {'STATE':<9} SINCE"
    )
    for s in rows:
        since = datetime.fromtimestamp(s.since / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        serving = f"{s.serving_version} (g{s.serving_generation})"
        desired = f"{s.desired_version} (g{s.desired_generation})" if s.desired_version else "-"
        print(
            f"{s.worker_id:<24} {s.model:<10} {serving:<16} {s.mode:<7} {s.candidate_version or '-':<10} "
            f"{desired:<16} {s.state:<9} {since}"
        )
        if s.reason:
            at = datetime.fromtimestamp(s.rejected_at / 1000, UTC).strftime("%H:%M:%S") if s.rejected_at else "?"
            generation = f" generation {s.rejected_generation}" if s.rejected_generation is not None else ""
            print(f"    last rejection at {at}: {s.rejected_version or '?'}{generation}: {s.reason}")
    return 0


def cmd_models_quality(args: argparse.Namespace) -> int:
    """Print the latest quality report of each model from the quality topic (written by `streamserve monitor`):
    per version its role, counts, measured and estimated quality; then each shadow or canary version against the
    live one, with the difference, its confidence interval and the verdict."""
    from streamserve.control.reading import read_keyed_records
    from streamserve.monitor.report import format_report, latest
    from streamserve.ops.preflight import check_kafka

    target = _control_target(args)
    topic = args.quality_topic or (target.settings.monitor.quality_topic if target.settings else "streamserve.quality")
    check_kafka(target.kafka, args.timeout)
    reports = [r for r in latest(read_keyed_records(target.kafka, topic)) if args.model in (None, r["model_name"])]
    if not reports:
        print(f"no quality report on {topic} yet (is `streamserve monitor` running, and have labels come?)")
        return 0
    for report in reports:
        print("\n".join(format_report(report)))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor (a faust-streaming worker) until SIGTERM/SIGINT: predictions and shadow predictions joined
    with the labels topic by event id in event time, quality per model version and window (measured, and
    estimated before the labels come), shadow and canary versions compared with the live one; reports go to the
    quality topic and to Prometheus (monitor.port). Start more processes with the same file to share the work:
    they split the join's monitor.partitions partitions (8), the one owning partition 0 also reports."""
    from streamserve.config import load_settings
    from streamserve.monitor.app import broker_urls, run
    from streamserve.ops.preflight import check_file, check_kafka

    if args.config is None:  # -c is optional on `monitor` only because `monitor join|export` take their own
        raise StreamServeError("streamserve monitor needs -c/--config (or: monitor join|export -c ...)")
    settings = load_settings(args.config)
    broker_urls(settings)  # refuses what the monitor's Kafka client cannot do, before any connection
    check_file(settings.output.schema_path, "output schema", "fix output.schema in the pipeline config")
    check_kafka(settings.kafka.common(), args.timeout)
    return run(settings, args.log_level)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Create an Ed25519 signing key (PEM, mode 0600) and print its public key for the workers to trust."""
    from streamserve.control.signing import generate

    public_path, public_line = generate(args.out)
    print(f"private key: {args.out} (keep it secret; pass it as `models publish --sign-key`)")
    print(f"public key:  {public_path}")
    print(public_line)
    print("trust it on the workers with control.trusted_keys, STREAMSERVE_CONTROL__TRUSTED_KEYS='[\"...\"]',")
    print("or a file of such lines in control.trusted_keys_file")
    return 0


def cmd_schemas_check(args: argparse.Namespace) -> int:
    """Ask the pipeline's Schema Registry whether the reader schema reads the latest writer schema of the input
    subject and whether the prediction schema is compatible with the registered one. Exit 0 when both are,
    1 when one is not (the reasons are printed), 2 when the check could not be made (config, registry down)."""
    from streamserve.config import load_settings
    from streamserve.ops.schema_registry import check_schemas

    settings = load_settings(args.config)
    kafka = settings.kafka.model_copy(update={"schema_registry_timeout_s": args.timeout})
    settings = settings.model_copy(update={"kafka": kafka})
    try:
        checks = check_schemas(settings)
    except StreamServeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the registry's client raises its own and its HTTP layer's errors
        print(
            f"streamserve: error: the Schema Registry at {settings.kafka.schema_registry_url} did not answer the "
            f"check: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    for check in checks:
        print(f"{'yes' if check.ok else 'NO '}  {check.title}")
        for line in check.lines:
            print(f"     {line}")
    return 0 if all(check.ok for check in checks) else 1


def cmd_lag_exporter(args: argparse.Namespace) -> int:
    """Serve the consumer group's lag as the broker sees it (committed offsets and watermarks, read through the
    Admin API on every scrape) on /metrics, until SIGTERM/SIGINT: the workers' lag seen from outside them."""
    from prometheus_client import CollectorRegistry, start_http_server

    from streamserve.config import load_settings
    from streamserve.observe.metrics import TargetFile
    from streamserve.ops.lagexport import BrokerLag, LagCollector
    from streamserve.ops.preflight import check_kafka

    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    registry = CollectorRegistry()
    registry.register(LagCollector(BrokerLag(settings.kafka.common(), settings.kafka.group_id, settings.input.topic,
                                             args.timeout)))  # fmt: skip
    server, _ = start_http_server(args.port, args.host, registry)
    targets_dir = settings.observe.targets_dir
    name, labels = f"lag-exporter-{settings.kafka.group_id}", {"job": "streamserve-lag"}
    target = TargetFile(targets_dir, name, labels) if targets_dir is not None else None
    if target is not None:  # the local stack's Prometheus finds it as it finds the workers
        target.write(args.host, server.server_port)
    log.info("lag of group %s on %s served on %s:%d/metrics", settings.kafka.group_id, settings.input.topic,
             args.host, server.server_port)  # fmt: skip
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
    stopped.wait()
    if target is not None:
        target.remove()
    server.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run an example end to end on the local stack: the card-fraud demo (default) or the predictive-maintenance
    example (a nested, nullable schema and a multi-input scikit-learn model with string labels)."""
    from streamserve.config import load_settings
    from streamserve.demo.logfile import log_to_file
    from streamserve.ops.preflight import check_pipeline_servers

    config = args.config or Path(f"examples/{args.example}/pipeline.yaml")
    settings = load_settings(config)
    check_pipeline_servers(settings, args.timeout)  # before minutes of training
    # The demo prints its steps and summary; the worker's log lines go to a file it names (text, no JSON).
    log_path = log_to_file(Path(settings.model.uri).parent.parent / "data", f"demo-{args.example}", args.log_level)
    print(f"the worker's log: {log_path}", flush=True)
    if args.example == "maintenance":
        from streamserve.demo.maintenance import run_example

        return run_example(config, args.events, args.partitions)
    if args.hybrid:
        from streamserve.demo.hybrid import run_hybrid

        return 0 if run_hybrid(config, args.events, args.partitions).ok else 1
    from streamserve.demo.run import run_demo

    return run_demo(config, args.events, args.partitions)


def cmd_backtest(args: argparse.Namespace) -> int:
    """Score a range of the input topic's history with a candidate version and the live one, through the worker's
    own BatchProcessor, and compare them: agreement and label flips, score deltas, latency per batch, and quality
    where the labels topic (monitor.labels_topic) has outcomes. The range is read outside the consumer group and
    nothing is committed. The live version is the one the control topic says the fleet serves (the config's before
    any announcement); the candidate is --candidate-uri when given, else the newest accepted announcement of
    --candidate on the control topic. Features are read from Redis as they are now: the report says so."""
    import json

    from streamserve.config import load_settings
    from streamserve.ops.backtest import BacktestRequest, run_backtest
    from streamserve.ops.comparison import render
    from streamserve.ops.history import parse_position
    from streamserve.ops.preflight import check_pipeline_files, check_pipeline_servers

    if not args.candidate and not args.candidate_uri:
        raise StreamServeError("give --candidate VERSION (announced on the control topic) or --candidate-uri PATH")
    start, end = parse_position(args.start), parse_position(args.end)
    settings = load_settings(args.config)
    check_pipeline_files(settings)
    check_pipeline_servers(settings, args.timeout)
    request = BacktestRequest(
        start,
        end,
        args.candidate,
        args.candidate_uri,
        args.jobs,
        args.batch_size,
        args.predictions_topic,
        args.parquet,
        max(args.timeout, 10.0),
    )
    report = run_backtest(settings, request)
    print(render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    """inspect: the dead letters grouped by stage and reason, with counts, first and last seen, and a sample (its
    original key, value size and headers). replay: re-produce the original key, value and headers of the selected
    dead letters to the input topic (--score: score them here and write predictions), each at most once: a
    compacted ledger topic (<dead_letter_topic>.replayed) records each replayed dead letter by its DLQ offset, in
    the same Kafka transaction as its replay, so a replay killed mid-way and run again replays each one once."""
    import json
    from datetime import UTC, datetime

    from streamserve.config import load_settings
    from streamserve.ops.deadletters import Selection, as_json, group, inspect, sample_lines, summary
    from streamserve.ops.history import parse_position
    from streamserve.ops.preflight import check_kafka
    from streamserve.ops.replay import ReplayRequest, read_dead_letters, run_replay

    since = parse_position(args.since) if args.since else None
    settings = load_settings(args.config)
    check_kafka(settings.kafka.common(), args.timeout)
    selection = Selection(args.stage, args.reason, since.time_ms if since is not None else None)
    topic = settings.output.dead_letter_topic

    def when(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")

    if args.action == "inspect":
        letters = read_dead_letters(settings.kafka.common(), topic, since, max(args.timeout, 10.0))
        read, groups = inspect(letters, selection)
        if args.json:
            print(json.dumps({"topic": topic, "read": read, "groups": as_json(groups)}, indent=2))
            return 0
        print(f"{topic}: {read} record(s) read, {sum(g.count for g in groups)} selected")
        for g in groups:
            print(f"{g.count:>8}  {g.stage} / {g.reason}  first {when(g.first_ms)}  last {when(g.last_ms)}")
            for message, count in g.messages.items():
                print(f"          {count:>6} x {message[:150]}")
            for line in sample_lines(g.sample) if g.sample is not None else []:
                print(f"          sample: {line}")
        return 0
    request = ReplayRequest(
        selection, since, args.dry_run, args.score, args.per_transaction, args.rate, max(args.timeout, 10.0)
    )
    todo, outcome = run_replay(settings, request)
    for g in group(todo.pending):
        print(f"{g.count:>8}  {g.stage} / {g.reason}  first {when(g.first_ms)}  last {when(g.last_ms)}")
    target = "scored to " + settings.output.topic if args.score else "to " + settings.input.topic
    print(f"{summary(todo, outcome)} ({target}; ledger {topic}.replayed)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score Parquet or Avro container files in batch with the worker's own decode -> features -> infer -> encode
    steps and rejection rules: predictions to --output (.parquet or .avro, the records the worker would produce),
    rejected rows with their stage and reason to --rejects. A feature the input carries as a column of its name
    is read from that column instead of Redis (the summary says which). --spark runs it on Spark instead."""
    from streamserve.config import load_settings

    settings = load_settings(args.config)
    if args.spark:
        from streamserve.spark import score_files_on_spark

        summary = score_files_on_spark(settings, args.config, args.input, args.output, args.spark)
    else:
        from streamserve.batch.job import score_files

        summary = score_files(settings, args.input, args.output, args.rejects, args.batch_rows)
    print(summary.text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="streamserve",
        description="Streaming inference: Avro events from Kafka, features from Redis, ONNX micro-batches, "
        "Avro predictions out; model versions hot-swapped through a control topic.",
        epilog="Environment: STREAMSERVE_<SECTION>__<KEY> overrides a key of the pipeline config; "
        "KAFKA_BOOTSTRAP_SERVERS and REDIS_URL (`scripts/stack env` prints the local stack's) set "
        "kafka.bootstrap_servers and redis.url unless their STREAMSERVE_ variable is set. Exit codes: 0 done; "
        "1 a check failed (schemas check, demo); 2 the command could not do its work (one line on stderr says "
        "which server or file, and what to do).",
    )
    parser.add_argument("--version", action="version", version=f"streamserve {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("STREAMSERVE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR: the lowest level of log lines on stderr, librdkafka's included "
        "(default INFO; env STREAMSERVE_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        default=os.environ.get("STREAMSERVE_LOG_FORMAT", "auto"),
        help="json: one JSON object per line with worker id, topic, partitions, offsets, batch id, model version "
        "and trace id; text: human-readable; auto (default): text on a terminal, JSON otherwise "
        "(env STREAMSERVE_LOG_FORMAT). Secrets are masked either way",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init", help="write a pipeline config from your schema and model", description=cmd_init.__doc__
    )
    init.add_argument("--schema", required=True, type=Path, help="Avro schema of your events (.avsc)")
    init.add_argument("--model", required=True, type=Path, help="your model in ONNX (.onnx)")
    init.add_argument("--out", type=Path, default=Path(DEFAULT_CONFIG), help=f"config to write ({DEFAULT_CONFIG})")
    init.add_argument("--topic", help="input topic (default: the schema's record name, kebab-case)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    init.set_defaults(func=cmd_init)

    offline = sub.add_parser(
        "check", help="check a pipeline config offline and score synthetic events", description=cmd_check.__doc__
    )
    _add_config(offline)
    offline.add_argument("--events", type=int, default=100, help="synthetic events to score (100)")
    offline.add_argument("--seed", type=int, default=0, help="seed of the synthetic events (0)")
    offline.add_argument("--redis", action="store_true", help="read Redis features from the real feature store")
    _add_timeout(offline, servers="Redis (with --redis)")
    offline.set_defaults(func=cmd_check)

    run = sub.add_parser(
        "run", help="run a worker (workers with one config form one consumer group)", description=cmd_run.__doc__
    )
    _add_config(run)
    _add_timeout(run, RUN_TIMEOUT_S, "Redis or Kafka")
    run.set_defaults(func=cmd_run)

    topics = sub.add_parser("topics", help="topic administration").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create the pipeline's input, output, DLQ, control, status topics")
    _add_config(create)
    _add_timeout(create)
    create.add_argument(
        "--partitions", type=int, default=4, help="partitions of the input, output and shadow topics (4)"
    )
    create.set_defaults(func=cmd_topics_create)

    acls = sub.add_parser("acls", help="Kafka ACLs of a pipeline's principals").add_subparsers(
        dest="action", required=True
    )
    grant = acls.add_parser(
        "grant",
        help="let the worker read input/control and write outputs; let only the publisher write control",
        description=cmd_acls_grant.__doc__,
    )
    _add_config(grant)
    _add_timeout(grant)
    grant.add_argument("--worker", default="User:worker", help="principal of the workers (User:worker)")
    grant.add_argument("--publisher", default="User:publisher", help="principal of `models publish` (User:publisher)")
    grant.set_defaults(func=cmd_acls_grant)

    produce = sub.add_parser(
        "produce", help="produce synthetic events of the input schema (load generator)", description=cmd_produce.__doc__
    )
    _add_config(produce)
    _add_timeout(produce)
    produce.add_argument("--count", type=int, default=10_000, help="events to produce (10000)")
    produce.add_argument("--rate", type=float, default=None, help="events per second (unlimited)")
    produce.add_argument("--seed", type=int, default=11, help="seed of the events (event ids depend on it)")
    produce.add_argument("--cards", type=int, default=2000, help="number of distinct cards (2000; the demo's schema)")
    produce.add_argument(
        "--entity-seed", type=int, default=7, help="seed of the cards and merchants (7; the demo's schema)"
    )
    produce.set_defaults(func=cmd_produce)

    features = sub.add_parser("features", help="feature store tools").add_subparsers(dest="action", required=True)
    load = features.add_parser(
        "load",
        help="bulk-load entity features from CSV/Parquet into Redis hashes",
        description=cmd_features_load.__doc__,
    )
    load.add_argument(
        "--file", type=Path, required=True, help="CSV with a header row (one entity per row), or .parquet"
    )
    load.add_argument(
        "--key-template", required=True, help="Redis key from row columns, e.g. 'card:{card_id}'; one hash per row"
    )
    load.add_argument(
        "--packed",
        metavar="COL,COL",
        help="instead of a hash: one little-endian float32 vector of these columns per row (features with "
        "layout: packed read it by index)",
    )
    load.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    _add_timeout(load, servers="Redis")
    load.set_defaults(func=cmd_features_load)
    stream = features.add_parser(
        "stream",
        help="keep windowed aggregates per entity (count/sum/mean/min/max/distinct over tumbling or hopping "
        "windows) in Redis from the input events: a faust-streaming app",
        description=inspect.cleandoc(cmd_features_stream.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example, in the pipeline YAML:\n"
        "  stream_features:\n"
        "    app_id: fraud-features\n"
        "    aggregates:\n"
        "      - {name: txn_count_10m, key: 'card_stream:{card_id}', function: count, window_s: 600}\n"
        "      - {name: amount_mean_1h, key: 'card_stream:{card_id}', function: mean, field: amount,\n"
        "         window_s: 3600, hop_s: 600}\n"
        "and a model feature reading one:\n"
        "  - {name: txn_count_10m, source: redis, key: 'card_stream:{card_id}', field: txn_count_10m,\n"
        "     default: 0, max_age_s: 600, updated_at_field: updated_at}",
    )
    _add_config(stream)
    _add_timeout(stream, default=RUN_TIMEOUT_S, servers="Kafka or Redis")
    stream.set_defaults(func=cmd_features_stream)

    models = sub.add_parser("models", help="model versions on the control topic").add_subparsers(
        dest="action", required=True
    )
    for name, func, help_text in (
        ("publish", cmd_models_publish, "announce a version: deploy, canary or shadow"),
        ("rollback", cmd_models_rollback, "return to the previous version (or --to VERSION)"),
        ("status", cmd_models_status, "show the version and state of every worker"),
        ("quality", cmd_models_quality, "show the latest quality of every version and how candidates compare"),
    ):
        cmd = models.add_parser(name, help=help_text, description=func.__doc__)
        _add_config(cmd, required=False)
        cmd.add_argument(
            "--bootstrap-servers", help="without -c: host:port of the brokers (default $KAFKA_BOOTSTRAP_SERVERS)"
        )
        cmd.add_argument(
            "--control-topic",
            default="streamserve.control",
            help="without -c: the topic of model announcements (streamserve.control)",
        )
        cmd.add_argument(
            "--status-topic",
            default="streamserve.status",
            help="without -c: the topic the workers report their state on (streamserve.status)",
        )
        _add_timeout(cmd)
        cmd.set_defaults(func=func)
        if name in ("publish", "rollback"):
            cmd.add_argument("--model", required=True, help="model name (the control topic's key)")
            cmd.add_argument("--notes", help="free text kept with the announcement")
            cmd.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) to sign the announcement with")
        if name == "quality":
            cmd.add_argument("--model", help="only this model (default: every model on the quality topic)")
            cmd.add_argument(
                "--quality-topic", help="the monitor's reports (default: monitor.quality_topic, streamserve.quality)"
            )
        if name == "publish":
            cmd.add_argument(
                "--version", required=True, dest="version", help="the version's name, e.g. v2 (predictions carry it)"
            )
            cmd.add_argument(
                "--uri", required=True, help="the .onnx artifact the workers load: a path, file:// or http(s):// URI"
            )
            cmd.add_argument("--sha256", help="artifact digest (computed from the artifact when readable)")
            cmd.add_argument(
                "--action",
                choices=["deploy", "canary", "shadow"],
                default="deploy",
                help="deploy: serve it everywhere; canary: serve it for --share of the keys; shadow: score with it "
                "beside the live version, to the shadow topic only (deploy)",
            )
            cmd.add_argument("--share", type=float, default=0.1, help="canary share of keys, 0 < share < 1 (0.1)")
            cmd.add_argument(
                "--reference",
                type=Path,
                metavar="FILE",
                help="Parquet or CSV sample of model inputs (one column per feature, as fed): its reference profile "
                "for drift (quantile bins, categories, the score) is written beside the artifact and signed with it",
            )
            cmd.add_argument(
                "--no-validate",
                action="store_true",
                help="announce without loading the model locally first (workers still validate it)",
            )
        if name == "rollback":
            cmd.add_argument("--to", help="version to return to (default: the one before the current)")

    monitor = sub.add_parser(
        "monitor",
        help="run the monitor: predictions joined with delayed labels, quality per version, canary/shadow vs live",
        description=cmd_monitor.__doc__,
    )
    _add_config(monitor, required=False)
    _add_timeout(monitor, RUN_TIMEOUT_S)
    monitor.set_defaults(func=cmd_monitor)
    training = monitor.add_subparsers(dest="monitor_action", metavar="ACTION", help="the retraining set (optional)")
    join = training.add_parser("join", help=cmd_monitor_join.__doc__, description=cmd_monitor_join.__doc__)
    export = training.add_parser("export", help=cmd_monitor_export.__doc__, description=cmd_monitor_export.__doc__)
    export.add_argument("--to", type=Path, required=True, metavar="FILE", help="the Parquet file to write")
    for cmd, func in ((join, cmd_monitor_join), (export, cmd_monitor_export)):
        _add_config(cmd)
        _add_timeout(cmd)
        cmd.set_defaults(func=func)

    keys = sub.add_parser("keys", help="signing keys of model announcements").add_subparsers(
        dest="action", required=True
    )
    keys_generate = keys.add_parser("generate", help="create a signing key pair", description=cmd_keys_generate.__doc__)
    keys_generate.add_argument("--out", type=Path, required=True, help="private key file to create (FILE.pub beside)")
    keys_generate.set_defaults(func=cmd_keys_generate)

    schemas = sub.add_parser("schemas", help="Schema Registry checks for CI/CD").add_subparsers(
        dest="action", required=True
    )
    check = schemas.add_parser(
        "check",
        help="can the reader schema read the registered writer schema; is the prediction schema compatible",
        description=cmd_schemas_check.__doc__,
    )
    _add_config(check)
    check.add_argument(
        "--timeout",
        type=float,
        default=ADMIN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"timeout of each request to the Schema Registry (replaces kafka.schema_registry_timeout_s; "
        f"{ADMIN_TIMEOUT_S:g})",
    )
    check.set_defaults(func=cmd_schemas_check)

    backtest = sub.add_parser(
        "backtest",
        help="score a range of history with a candidate and the live version, and compare them",
        description=cmd_backtest.__doc__,
        epilog="TIME: ISO 8601 (2026-12-06T10:00:00Z; no zone means UTC), now, or -30m/-2h/-7d before now; "
        "OFFSETS: PARTITION:OFFSET[,PARTITION:OFFSET...] (in --from: only those partitions are read; in --to: the "
        "others are read to their end); also beginning, end. "
        "The range is [--from, --to): --to is exclusive. Write a relative time with '=': --from=-2h.",
    )
    _add_config(backtest)
    _add_timeout(backtest, servers="Redis or Kafka")
    backtest.add_argument("--candidate", help="the candidate's version, as announced on the control topic (e.g. v2)")
    backtest.add_argument(
        "--candidate-uri",
        help="the candidate's .onnx artifact (path, file:// or http(s)://) instead of the control "
        "topic; --candidate names its version then (default: candidate)",
    )
    backtest.add_argument("--from", dest="start", required=True, metavar="TIME|OFFSETS", help="where the range starts")
    backtest.add_argument("--to", dest="end", default="end", metavar="TIME|OFFSETS", help="where it ends (end)")
    backtest.add_argument(
        "--jobs", type=int, default=1, help="score the partition ranges in this many processes (1: in this one)"
    )
    backtest.add_argument("--batch-size", type=int, default=1000, help="records per micro-batch (1000)")
    backtest.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON to FILE")
    backtest.add_argument("--predictions-topic", help="also produce the candidate's predictions to this topic")
    backtest.add_argument("--parquet", type=Path, metavar="FILE", help="also write both versions' predictions here")
    backtest.set_defaults(func=cmd_backtest)

    dlq = sub.add_parser("dlq", help="inspect and replay dead letters").add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("inspect", "dead letters grouped by stage and reason, with a sample of each"),
        ("replay", "replay the selected dead letters to the input topic, each at most once"),
    ):
        cmd = dlq.add_parser(name, help=help_text, description=cmd_dlq.__doc__)
        _add_config(cmd)
        _add_timeout(cmd)
        cmd.add_argument(
            "--stage", help="only dead letters of this stage (decode, features, enrich, infer, encode, produce)"
        )
        cmd.add_argument("--reason", help="only this error class (e.g. FeatureError), or a piece of the error message")
        cmd.add_argument("--since", metavar="TIME", help="only dead letters written at or after TIME (see backtest)")
        cmd.set_defaults(func=cmd_dlq)
        if name == "inspect":
            cmd.add_argument("--json", action="store_true", help="print the groups as JSON")
        else:
            cmd.add_argument("--dry-run", action="store_true", help="show what would be replayed; write nothing")
            cmd.add_argument(
                "--score",
                action="store_true",
                help="score them here with the live version instead: predictions "
                "to the output topic, failures to the DLQ again",
            )
            cmd.add_argument("--rate", type=float, help="at most this many dead letters per second (unlimited)")
            cmd.add_argument(
                "--per-transaction", type=int, default=200, help="dead letters per Kafka transaction (200)"
            )

    lag = sub.add_parser(
        "lag-exporter",
        help="serve the group's lag measured at the broker (Prometheus)",
        description=cmd_lag_exporter.__doc__,
    )
    _add_config(lag)
    _add_timeout(lag)
    lag.add_argument("--port", type=int, default=9466, help="port of /metrics (9466; 0 picks a free one)")
    lag.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    lag.set_defaults(func=cmd_lag_exporter)

    score = sub.add_parser(
        "score",
        help="score Parquet/Avro files in batch (or on Spark) exactly as the worker scores the stream",
        description=cmd_score.__doc__,
    )
    _add_config(score)
    score.add_argument(
        "--input", required=True, help="a .parquet or .avro file, a directory of them, or a glob ('data/*.parquet')"
    )
    score.add_argument("--output", required=True, type=Path, help="predictions file: .parquet or .avro")
    score.add_argument(
        "--rejects",
        type=Path,
        help="rejected rows (file, row, stage, reason, the row as JSON); default "
        "OUTPUT's name with .rejects before its suffix, written only when a row is rejected",
    )
    score.add_argument("--batch-rows", type=int, default=4096, help="rows per record batch (4096)")
    score.add_argument(
        "--spark", metavar="MASTER", help="run on Spark with this master, e.g. local[4] (needs the spark extra)"
    )
    score.set_defaults(func=cmd_score)

    demo = sub.add_parser(
        "demo", help="run the card-fraud demo end to end on a running local stack", description=cmd_demo.__doc__
    )
    demo.add_argument(
        "--example", choices=["fraud", "maintenance"], default="fraud", help="which example to run (fraud)"
    )
    demo.add_argument("-c", "--config", type=Path, help="pipeline config (default examples/<example>/pipeline.yaml)")
    demo.add_argument("--events", type=int, default=20_000, help="events to stream (20000)")
    demo.add_argument("--partitions", type=int, default=4, help="partitions of the demo topics (4)")
    demo.add_argument(
        "--hybrid",
        action="store_true",
        help="the hybrid demo instead (fraud example): score a Parquet file in batch, backtest v2 on the stream's "
        "history before the swap, and replay the dead letters after loading the missing Redis keys",
    )
    _add_timeout(demo, servers="Redis or Kafka")
    demo.set_defaults(func=cmd_demo)
    return parser


def _environment_errors() -> tuple[type[BaseException], ...]:
    """What a command's servers and files raise that is not ours: reported in one line, never a traceback."""
    from confluent_kafka import KafkaException
    from redis import RedisError

    return KafkaException, RedisError, OSError


def _one_line(exc: BaseException) -> str:
    """A third-party error as one line that names its source."""
    from confluent_kafka import KafkaError, KafkaException
    from redis import RedisError

    if isinstance(exc, KafkaException):
        error = exc.args[0] if exc.args else None
        text = f"Kafka: {error.str() if isinstance(error, KafkaError) else exc}"
    elif isinstance(exc, RedisError):
        text = f"Redis: {exc}"
    elif isinstance(exc, TimeoutError):
        text = f"gave up waiting for a server{': ' + str(exc) if str(exc) else ''} (`scripts/stack status` shows "
        text += "whether the local stack runs; --timeout waits longer)"
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `streamserve` command."""
    from streamserve.ops.preflight import env_overrides

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    env_overrides()
    try:
        return int(args.func(args))
    except StreamServeError as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"streamserve: error: {exc}", file=sys.stderr)
        return 2
    except _environment_errors() as exc:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"streamserve: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a command ends with one line, never a traceback; --log-level DEBUG shows it
        log.debug("%s failed", args.command, exc_info=True)
        print(
            f"streamserve: error: unexpected {_one_line(exc)} (--log-level DEBUG shows where; please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
